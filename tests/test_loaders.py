"""Real loaders over ``cachehub://`` against an S3 lake (SeaweedFS): pandas, pyarrow, Hugging Face
datasets, and a PyTorch-style map Dataset read by forked workers (``examples/loaders.py``).

PyTorch itself is not installed here: its PyPI wheel pulls about 3 GB of CUDA libraries. The
Dataset is tested through the protocol a ``DataLoader`` uses (``len``, ``[i]``, forked workers);
docs/loaders.md says so.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import sys
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from cachehub import Hub
from cachehub.config import load_settings

from .conftest import BUCKET, SeaweedServer, write_tree

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import loaders  # noqa: E402


@pytest.fixture
def s3_hub(seaweed: SeaweedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Hub:
    monkeypatch.setenv("CACHEHUB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CACHEHUB_LAKE", f"s3://{BUCKET}/{uuid.uuid4().hex}")
    monkeypatch.setenv("CACHEHUB_ENDPOINT_URL", seaweed.endpoint)
    for var in ("CACHEHUB_CONFIG", "CACHEHUB_SITE"):
        monkeypatch.delenv(var, raising=False)
    with Hub(load_settings()) as hub:
        yield hub


@pytest.fixture
def tables(s3_hub: Hub, tmp_path: Path) -> pd.DataFrame:
    """Three parquet files in hive partitions (year=...), pushed as tables@v1; the whole frame."""
    src = tmp_path / "tables"
    frames = []
    for year in (2024, 2025, 2026):
        frame = pd.DataFrame({"id": range(year * 10, year * 10 + 50), "score": [i / 7 for i in range(50)]})
        (src / f"year={year}").mkdir(parents=True)
        frame.to_parquet(src / f"year={year}" / "part-0.parquet", index=False)
        frames.append(frame.assign(year=year))
    s3_hub.push(src, "tables", tag="v1")
    return pd.concat(frames, ignore_index=True)


def test_pandas_reads_parquet_from_an_uncached_commit(s3_hub: Hub, tables: pd.DataFrame) -> None:
    one = loaders.read_table("cachehub://tables@v1/year=2025/part-0.parquet")
    pd.testing.assert_frame_equal(one, tables[tables.year == 2025].drop(columns="year").reset_index(drop=True))
    assert not s3_hub.status()[0].commits  # read from the lake, nothing cached


def test_pyarrow_dataset_scans_partitions_and_filters(s3_hub: Hub, tables: pd.DataFrame) -> None:
    dataset = loaders.arrow_dataset("cachehub://tables@v1/")
    table = dataset.to_table(filter=pads.field("year") == 2026, columns=["id", "score"])
    assert table.num_rows == 50 and table.column("id").to_pylist() == list(range(20260, 20310))
    assert dataset.to_table().num_rows == 150
    assert dataset.schema.field("score").type == pa.float64()


def test_hugging_face_datasets_loads_parquet(s3_hub: Hub, tables: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the parquet builder ships in the package; any call to the Hub would go to a closed port on
    # loopback and fail the test ("offline mode" cannot be used: it refuses every non-local URL)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    ds = loaders.hf_dataset("cachehub://tables@v1/year=2024/part-0.parquet")
    assert ds.num_rows == 50 and ds.column_names == ["id", "score"] and ds[0]["id"] == 20240


def _read(item: tuple[loaders.ImageFolder, int]) -> tuple[bytes, int, int]:
    dataset, i = item
    data, label = dataset[i]
    return data, label, os.getpid()


@pytest.fixture
def images(s3_hub: Hub, tmp_path: Path) -> dict[str, bytes]:
    rng = random.Random(4)
    files = {f"{cls}/{i:03d}.png": b"\x89PNG\r\n\x1a\n" + rng.randbytes(rng.randint(200, 3000)) for cls in ("cat", "dog") for i in range(12)}
    s3_hub.push(write_tree(tmp_path / "images", files), "images", tag="v1")
    return files


def test_an_image_dataset_read_by_worker_processes(s3_hub: Hub, images: dict[str, bytes]) -> None:
    before = len(list(s3_hub.catalog.audit_events(action="use")))
    dataset = loaders.ImageFolder("cachehub://images@v1")
    assert len(dataset) == 24 and dataset.classes == ["cat", "dog"]
    # what DataLoader(dataset, num_workers=2, multiprocessing_context="spawn") does: the
    # dataset is pickled (URLs only) and each worker opens its own filesystem
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        got = pool.map(_read, [(dataset, i) for i in range(len(dataset))])
    for i, (data, label, _pid) in enumerate(got):
        path = dataset.files[i].split("/", 1)[1]
        assert data == images[path] and dataset.classes[label] == path.split("/")[0]
    workers = {pid for _, _, pid in got}
    uses = len(list(s3_hub.catalog.audit_events(action="use"))) - before
    assert 1 <= uses <= 1 + len(workers)  # the listing's filesystem, then one per worker: not one per image


def test_forked_workers_get_a_clear_error_not_a_hang(s3_hub: Hub, images: dict[str, bytes]) -> None:
    """The S3 client cannot run after fork(): a forked worker fails at once and names the fix."""
    dataset = loaders.ImageFolder("cachehub://images@v1")  # the parent has used the S3 lake
    with multiprocessing.get_context("fork").Pool(1) as pool:
        pending = pool.map_async(_read, [(dataset, 0)])
        with pytest.raises(Exception, match="spawn") as caught:
            pending.get(timeout=60)
    assert "forked" in str(caught.value)
