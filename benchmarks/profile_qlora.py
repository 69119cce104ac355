"""Where a QLoRA step and an NF4 load spend their time at Llama-2-7B width, per transformer layer:

    python -m benchmarks.profile_qlora [--stack minilora|peft] [--steps 2]

The 2-layer hidden-4096 checkpoint of the fidelity case (`pytest benchmarks --benchmark -k fidelity` builds
it) stands in for the 32-layer 7B model: every layer is the same, so the per-layer split is the 7B split.
Both stacks load it with quantize NF4 (double quant, QLoRA's fp32 residual; bf16 products, or fp32 ones on
CPUs without fast bf16 kernels, where peft's would take PyTorch's reference kernel), LoRA r=16 on all seven
projections, dropout 0.05, gradient checkpointing, batch 1 x 256. Self CPU time of every op is summed into
dequantize (bitsandbytes' 4-bit and blockwise kernels), matmul (mm / addmm / bmm / linear), and the rest.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import assets
from benchmarks.cases import WIDE
from benchmarks.stacks import (
    LLAMA_PROJECTIONS, add_lora, enable_gradient_checkpointing, fast_bf16_products, load, seeded_lora_init,
)

GROUPS = {"dequantize": ("bitsandbytes::dequantize",), "quantize": ("bitsandbytes::quantize", "aten::bucketize"),
          "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product")}


def split(prof) -> dict[str, float]:
    """Self CPU seconds per group."""
    out: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        group = next((g for g, prefixes in GROUPS.items() if event.key.startswith(prefixes)), "rest")
        out[group] += event.self_cpu_time_total / 1e6
    return dict(out)


def show(title: str, wall: float, groups: dict[str, float]) -> None:
    total = sum(groups.values())
    parts = ", ".join(f"{g} {s:.1f} s ({s / total:.0%})" for g, s in sorted(groups.items(), key=lambda x: -x[1]))
    print(f"{title}: wall {wall:.1f} s; self CPU {total:.1f} s: {parts}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stack", default="minilora", choices=["minilora", "peft"])
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    precision = "nf4" if fast_bf16_products("cpu") else "nf4-fp32"
    path = assets.checkpoint_dir(WIDE)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        model = load(args.stack, path, precision=precision, device=torch.device("cpu"))
        wall = time.perf_counter() - start
    show(f"{args.stack} {precision} load of 2 hidden-4096 layers + embeddings and head", wall, split(prof))
    model = add_lora(args.stack, model, r=16, alpha=32, dropout=0.05, targets=LLAMA_PROJECTIONS)
    seeded_lora_init(model, 0)
    enable_gradient_checkpointing(args.stack, model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    _, batches = assets.lm_batches(assets.SHAPES["llama2-7b"]["vocab_size"], 1, 256, args.steps + 1)

    def step(batch: dict) -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for batch in batches[1:]:
            step(batch)
        wall = (time.perf_counter() - start) / args.steps
    groups = {g: s / args.steps for g, s in split(prof).items()}
    show(f"{args.stack} {precision} QLoRA step (per step, 2 layers, gradient checkpointing, 1 x 256)", wall, groups)


if __name__ == "__main__":
    main()
