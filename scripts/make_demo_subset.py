#!/usr/bin/env python3
"""Cut a bundled IDX subset (the first TRAIN training and TEST test images,
unchanged bytes, IDX format, gzip) from the full files. Standard library only.

    python3 scripts/make_demo_subset.py ../shared/data/fashion-mnist data/fashion-mnist-subset 2000 500
    python3 scripts/make_demo_subset.py ../shared/data/mnist data/mnist-subset 1000 200
"""
import gzip
import struct
import sys
from pathlib import Path



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
    splits = {"train": int(sys.argv[3]), "t10k": int(sys.argv[4])}
    dst.mkdir(parents=True, exist_ok=True)
    for split, count in splits.items():
        cut(src, dst, f"{split}-images-idx3-ubyte", count)
        cut(src, dst, f"{split}-labels-idx1-ubyte", count)


if __name__ == "__main__":
    main()
