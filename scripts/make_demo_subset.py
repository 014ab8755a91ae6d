#!/usr/bin/env python3
"""Cut the bundled Fashion-MNIST subset (first 2,000 train and 500 test images,
unchanged bytes, IDX format, gzip) from the full files. Standard library only.

    python3 scripts/make_demo_subset.py ../shared/data/fashion-mnist data/fashion-mnist-subset
"""
import gzip
import struct
import sys
from pathlib import Path

SPLITS = {"train": 2000, "t10k": 500}


def cut(src: Path, dst: Path, stem: str, count: int) -> None:
    raw = gzip.decompress((src / f"{stem}.gz").read_bytes())
    magic = struct.unpack(">I", raw[:4])[0]
    ndims = magic & 0xFF
    dims = list(struct.unpack(">" + "I" * ndims, raw[4 : 4 + 4 * ndims]))
    per_item = 1
    for d in dims[1:]:
        per_item *= d
    header = raw[:4] + struct.pack(">I", count) + raw[8 : 4 + 4 * ndims]
    body = raw[4 + 4 * ndims : 4 + 4 * ndims + count * per_item]
    # mtime=0 keeps the output byte-identical between runs.
    (dst / f"{stem}.gz").write_bytes(gzip.compress(header + body, mtime=0))


def main() -> None:
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    dst.mkdir(parents=True, exist_ok=True)
    for split, count in SPLITS.items():
        cut(src, dst, f"{split}-images-idx3-ubyte", count)
        cut(src, dst, f"{split}-labels-idx1-ubyte", count)


if __name__ == "__main__":
    main()
