"""Peak training memory of finetune-resnet50 at its defaults (batch 64, 160 px, bf16 on CUDA).

On a CUDA device it runs real training steps through the engine and reports
``torch.cuda.max_memory_allocated``. Everywhere it also gives an estimate from activation sizes: the bytes
of every tensor autograd saves for the backward pass (in the autocast dtype), plus weights, gradients and
SGD momentum in fp32. Prints one JSON object.

    python bench/finetune_memory.py [--batch-size 64] [--image-size 160] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402

from cifarnet_cli.config import FINETUNE_DEFAULTS, TrainConfig  # noqa: E402
from cifarnet_cli.devices import Precision, resolve_device, resolve_precision  # noqa: E402
from cifarnet_cli.engine import build_optimizer, train_one_epoch  # noqa: E402
from cifarnet_cli.models import get_model  # noqa: E402

GIB = 2**30


def estimate(batch: int, image_size: int, dtype: torch.dtype) -> dict[str, float]:
    """Bytes saved for backward in one forward pass (counted once per storage), on the CPU."""
    model = get_model("resnet50", image_size=image_size)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.rand(batch, 3, 32, 32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=dtype):
        loss = F.cross_entropy(model(x), torch.zeros(batch, dtype=torch.long))
    del loss
    params = sum(p.numel() for p in model.parameters()) * 4
    activations = sum(seen.values())
    return {
        "activations_gib": round(activations / GIB, 3),
        "weights_grads_momentum_gib": round(3 * params / GIB, 3),
        "total_gib": round((activations + 3 * params) / GIB, 3),
    }


def measure_cuda(batch: int, accum: int, image_size: int, device: torch.device, precision: Precision) -> float:
    model = get_model("resnet50", image_size=image_size).to(device).to(memory_format=torch.channels_last)
    opt = build_optimizer(model, TrainConfig(**{**FINETUNE_DEFAULTS, "batch_size": batch, "accum": accum}))
    batches = [
        (
            torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last),
            torch.randint(0, 10, (batch,), device=device),
        )
        for _ in range(2 * accum)
    ]

    def steps(n: int) -> None:
        train_one_epoch(
            model, batches[:n], opt, batch_sizes=[batch] * n, accum=accum, device=device, precision=precision
        )

    steps(accum)  # warm-up: cuDNN's autotuning tries workspaces far larger than the one it keeps
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    steps(len(batches))
    return torch.cuda.max_memory_allocated(device) / GIB


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=FINETUNE_DEFAULTS["batch_size"])
    parser.add_argument("--accum", type=int, default=FINETUNE_DEFAULTS["accum"])
    parser.add_argument("--image-size", type=int, default=FINETUNE_DEFAULTS["image_size"])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    result: dict[str, object] = {
        "benchmark": "finetune_memory",
        **environment(device),
        "batch_size": args.batch_size,
        "accum": args.accum,
        "image_size": args.image_size,
        "estimate_bf16": estimate(args.batch_size, args.image_size, torch.bfloat16),
    }
    if device.type == "cuda":
        precision = resolve_precision("auto", device)
        result["precision"] = precision.name
        result["cuda_max_memory_allocated_gib"] = round(
            measure_cuda(args.batch_size, args.accum, args.image_size, device, precision), 3
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
