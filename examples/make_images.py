"""Generate a small, deterministic image-classification dataset of real PNG files.

    python examples/make_images.py OUT_DIR [--version 1|2|3] [--per-class 20]

Version 1 is the base set; version 2 rewrites a few images, adds some and deletes some;
version 3 adds a new class. Only the standard library is used (zlib writes the PNGs).
"""

from __future__ import annotations

import argparse
import random
import shutil
import struct
import zlib
from pathlib import Path

CLASSES = ["normal", "pneumonia", "effusion", "nodule", "mass"]


def png(width: int, height: int, pixels: bytes) -> bytes:
    """Encode 8-bit greyscale pixels as a PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + pixels[y * width : (y + 1) * width] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b"")


def image(rng: random.Random, size: int = 64) -> bytes:
    cx, cy, r = rng.randrange(size), rng.randrange(size), rng.randrange(4, size // 2)
    noise = rng.randbytes(size * size)
    pixels = bytes(
        min(255, (200 if (x - cx) ** 2 + (y - cy) ** 2 < r * r else 40) + noise[y * size + x] % 40)
        for y in range(size)
        for x in range(size)
    )
    return png(size, size, pixels)


def build(out: Path, version: int, per_class: int = 20) -> None:
    if out.exists():
        shutil.rmtree(out)
    rng = random.Random(1234)
    classes = CLASSES + (["atelectasis"] if version >= 3 else [])
    for cls in classes:
        (out / cls).mkdir(parents=True)
        for i in range(per_class):
            data = image(rng)
            if version >= 2 and cls == "normal" and i < 3:
                data = image(random.Random(f"v2-{i}"))  # re-labelled / re-exported images
            if version >= 2 and cls == "mass" and i >= per_class - 2:
                continue  # removed as duplicates
            (out / cls / f"{cls}_{i:04d}.png").write_bytes(data)
        if version >= 2 and cls == "nodule":
            for i in range(per_class, per_class + 4):
                (out / cls / f"{cls}_{i:04d}.png").write_bytes(image(random.Random(f"v2-new-{i}")))
    (out / "labels.csv").write_text(
        "path,label\n" + "".join(f"{p.relative_to(out).as_posix()},{p.parent.name}\n" for p in sorted(out.rglob("*.png")))
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--version", type=int, default=1, choices=(1, 2, 3))
    parser.add_argument("--per-class", type=int, default=20)
    args = parser.parse_args()
    build(args.out, args.version, args.per_class)
    print(f"wrote version {args.version} to {args.out}")
