"""Reading a commit through ``cachehub://`` with the usual loaders, cached or not (docs/loaders.md).

    python examples/loaders.py tables@v1 images@v1

Nothing here is specific to cachehub but the URL: pandas, pyarrow, Hugging Face datasets and a
PyTorch-style Dataset open the files through fsspec, which finds the ``cachehub`` protocol by
its entry point. Where the commit is cached at the site the bytes are read there; otherwise
they come from the lake with ranged reads, each verified before it is returned.
"""

from __future__ import annotations

import argparse
from typing import Any

import fsspec

try:  # a real torch Dataset when torch is installed; the same protocol without it
    from torch.utils.data import Dataset as _Base
except ImportError:  # pragma: no cover - exercised where torch is absent
    _Base = object  # type: ignore[assignment,misc]


def read_table(url: str, **storage_options: Any) -> Any:
    """A parquet file or a folder of them as a pandas DataFrame."""
    import pandas as pd

    return pd.read_parquet(url, storage_options=storage_options or None)


def arrow_dataset(url: str, **storage_options: Any) -> Any:
    """A folder of parquet files as a pyarrow Dataset (lazy: only what a scan touches is read)."""
    import pyarrow.dataset as ds

    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    return ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive")


def hf_dataset(url: str, **storage_options: Any) -> Any:
    """Parquet files as a Hugging Face ``datasets.Dataset``."""
    import datasets

    return datasets.load_dataset("parquet", data_files=url, split="train", storage_options=storage_options or None)


class ImageFolder(_Base):  # type: ignore[misc,valid-type]
    """A map-style Dataset (PyTorch's protocol: ``len`` and ``[i]``) of ``<class>/<file>`` images.

    It keeps only URLs, so it pickles small and each DataLoader worker opens its own filesystem
    (fsspec makes a new instance per process): one recorded use per worker, not per image.
    """

    def __init__(self, url: str, pattern: str = "**/*.png", **storage_options: Any) -> None:
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.storage_options = storage_options
        self.files = sorted(fs.glob(f"{root.rstrip('/')}/{pattern}"))
        self.classes = sorted({f.rsplit("/", 2)[-2] for f in self.files})
        self.index = {c: i for i, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[bytes, int]:
        path = self.files[i]
        with fsspec.open(f"cachehub://{path}", "rb", **self.storage_options) as fh:
            data = fh.read()
        return data, self.index[path.rsplit("/", 2)[-2]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tables", help="a ref holding parquet files, e.g. tables@v1")
    parser.add_argument("images", help="a ref holding <class>/<image> files, e.g. images@v1")
    parser.add_argument("--site", default=None)
    args = parser.parse_args()
    options = {"site": args.site} if args.site else {}
    frame = read_table(f"cachehub://{args.tables}/", **options)
    print(f"pandas: {len(frame)} rows, columns {list(frame.columns)}")
    scanned = arrow_dataset(f"cachehub://{args.tables}/", **options).to_table()
    print(f"pyarrow: {scanned.num_rows} rows")
    images = ImageFolder(f"cachehub://{args.images}", **options)
    data, label = images[0]
    print(f"images: {len(images)} in {len(images.classes)} classes; the first is {len(data)} bytes of class {images.classes[label]}")


if __name__ == "__main__":
    main()
