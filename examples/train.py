"""A minimal 'training' script that reads its data through cachehub.resolve().

    python examples/train.py chest-xray@v3 [--fetch]

It does no learning: it walks the cached, read-only tree, counts images per class and checks
that every file is a PNG, the way a data loader would touch them.
"""

from __future__ import annotations

import argparse
import collections

import cachehub


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ref", help="dataset reference, e.g. chest-xray@v3")
    parser.add_argument("--fetch", action="store_true", help="cache the commit first if needed")
    args = parser.parse_args()

    root = cachehub.resolve(args.ref, fetch=args.fetch)  # a local, read-only path
    counts: collections.Counter[str] = collections.Counter()
    for image in sorted(root.rglob("*.png")):
        with open(image, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", f"{image} is not a PNG"
        counts[image.parent.name] += 1
    print(f"training on {args.ref} from {root}")
    for label, n in sorted(counts.items()):
        print(f"  {label:12} {n:4} images")


if __name__ == "__main__":
    main()
