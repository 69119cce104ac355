"""Loss curves of minilora's QLoRA step three ways, to show what bf16 rounding does to training:

    python -m benchmarks.bf16_rounding        # 8 steps, SmolLM2-135M NF4, LoRA r=16 on 7 projections

- fp32: NF4 base with fp32 compute, the reference;
- bf16: bf16 compute as minilora runs it on this CPU (products in fp32 on CPUs without fast bf16 GEMMs,
  each output rounded once; see minilora/ops/gemm.py);
- bf16 native: bf16 compute through PyTorch's bf16 kernels, where the LoRA update is added into an
  already rounded bf16 base output, as peft does.
Same weights, LoRA init, batches (4 of 2 x 64, cycled) and AdamW (lr 2e-4), dropout 0.
"""
from __future__ import annotations

import torch

import minilora as ml
from benchmarks import assets
from benchmarks.stacks import LLAMA_PROJECTIONS, seeded_lora_init
from minilora.ops import gemm


def curve(dtype: torch.dtype, steps: int = 8) -> list[float]:
    torch.manual_seed(0)
    _, path = assets.smollm2_dir()
    _, batches = assets.lm_batches(assets.SHAPES["smollm2-135m"]["vocab_size"], 2, 64, 4, 0)
    model = ml.from_pretrained(path, quantize=ml.QuantConfig("nf4", compute_dtype=dtype), dtype=dtype)
    ml.apply_lora(model, ml.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LLAMA_PROJECTIONS))
    seeded_lora_init(model, 0)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
    losses = []
    for i in range(steps):
        loss = model(**batches[i % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main() -> None:
    torch.set_num_threads(2)
    reference = curve(torch.float32)
    print("fp32        ", " ".join(f"{x:.4f}" for x in reference))
    for label, fast in (("bf16", gemm.cpu_has_fast_bf16_gemm()), ("bf16 native", True)):
        gemm.cpu_has_fast_bf16_gemm = lambda fast=fast: fast
        losses = curve(torch.bfloat16)
        worst = max(abs(a - b) / b for a, b in zip(losses, reference, strict=True))
        print(f"{label:<12}", " ".join(f"{x:.4f}" for x in losses), f"  max relative difference to fp32 {worst:.2e}")


if __name__ == "__main__":
    main()
