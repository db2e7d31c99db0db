"""Loading an image folder: the first load (walk, decode, content fingerprint, verified cache write) against a
cache hit (walk and stat every file, read the entry back, check its SHA-256). Prints one JSON object.

    python bench/folder_cache.py [FOLDER]     # default: ../shared/datasets/cifar10-jpeg (50,000 JPEGs)

The cache goes to a temporary folder, so the user's own cache is neither used nor changed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402

from cifarnet_cli.data import cache, sources  # noqa: E402

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path, nargs="?", default=DEFAULT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CIFARNET_CACHE"] = tmp
        start = time.perf_counter()
        first = sources.load_source(args.folder)
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        scan = sources._scan_folder(first.location, None)
        scan_s = time.perf_counter() - start
        entry = cache.entry_path(first.location, scan.classes)
        start = time.perf_counter()
        hit, _damage = cache.read(entry, scan.key)
        read_s = time.perf_counter() - start
        start = time.perf_counter()
        again = sources.load_source(args.folder)
        hit_s = time.perf_counter() - start
        result = {
            "folder": str(args.folder),
            "images": sum(len(s) for s in first.splits.values()),
            "cache_mb": round(entry.stat().st_size / 1e6, 1),
            "first_load_s": round(first_s, 2),
            "cache_hit_s": round(hit_s, 2),
            "of_which_scan_s": round(scan_s, 2),
            "of_which_read_and_verify_s": round(read_s, 2),
            "hit": hit is not None and again.fingerprint == first.fingerprint,
            **environment(torch.device("cpu")),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
