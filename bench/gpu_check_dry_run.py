"""cifarnet's command line with `bench` shrunk to seconds, for bench/gpu-check.sh --cpu-dry-run: the dry run then
runs the check's own command lines, and what it measures means nothing.

    python bench/gpu_check_dry_run.py ARGS...   (as `cifarnet ARGS...`)
"""

from __future__ import annotations

import sys

from cifarnet_cli import benchmark
from cifarnet_cli.cli import main
from cifarnet_cli.config import FINETUNE_DEFAULTS, TrainConfig

benchmark.MICRO_BATCHES = (8, 16)
benchmark.PREDICT_BATCH = 8
benchmark.RECIPE = TrainConfig(batch_size=16)
benchmark.FINETUNE_DEFAULTS = {**FINETUNE_DEFAULTS, "image_size": 32, "batch_size": 2, "accum": 2}
benchmark.BenchSizes.for_device = staticmethod(  # type: ignore[method-assign]
    lambda device, quick: benchmark.BenchSizes(32, 1, 1, 2, False)
)

if __name__ == "__main__":
    sys.argv[0] = "cifarnet"
    main()
