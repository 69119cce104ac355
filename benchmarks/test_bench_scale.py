"""Llama-2-7B shape (32 layers, random bf16 weights in 2 shards), opt-in with --benchmark-scale (the checkpoint
is 13.5 GB; peft's side needs ~20 GB RAM; ~15+ minutes on a CPU):

    pytest benchmarks --benchmark --benchmark-scale -k scale

QLoRA NF4 step with gradient checkpointing, batch 1 x 256, both stacks at QLoRA's precision (fp32 residual,
bf16 compute; fp32 compute on CPUs without fast bf16 kernels, where peft's bf16 products would take PyTorch's
reference kernel): tokens/s, peak RSS (load and training), MFU; the load time is in the same rows' results.
"""
from __future__ import annotations

import pytest

from benchmarks import report
from benchmarks.cases import SCALE
from benchmarks.stacks import fast_bf16_products


@pytest.fixture(autouse=True)
def _opt_in(pytestconfig):
    if not pytestconfig.getoption("--benchmark-scale"):
        pytest.skip("a 7B-shaped case: pass --benchmark-scale")


@pytest.mark.full_only
def test_scale_qlora_step(compare, bench):
    bench.prepare(SCALE)
    fast_bf16 = fast_bf16_products(bench.device)
    params = {"shape": "llama2-7b", "precision": "nf4" if fast_bf16 else "nf4-fp32", "gradient_checkpointing": True,
              "batch_size": 1, "seq_len": 256, "warmup": 1, "steps": 2}

    label = f"Llama-2-7B shape, QLoRA NF4 ({'bf16' if fast_bf16 else 'fp32'} compute), gradient checkpointing, 1 x 256"
    pairs = compare("train:scale", "train_step", params,
                    lambda p: report.scale_rows(report.SECTIONS["train"], label, p))
    for stack, result in pairs.items():
        assert all(0 < loss < 20 for loss in result["losses"]), f"{stack}: {result['losses']}"
