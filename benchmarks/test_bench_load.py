"""4. Loading the TinyLlama-1.1B-shaped sharded bf16 checkpoint as bf16, as NF4 (quantized while loading), and
the pre-quantized NF4 folder minilora saves from it."""
from __future__ import annotations

import pytest

from benchmarks import report

VARIANTS = {"bf16": "bf16", "nf4": "bf16 -> NF4 while loading", "prequantized": "pre-quantized NF4 folder"}


@pytest.mark.full_only
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_load(compare, bench, variant):
    bench.prepare("tinyllama-1.1b-bf16")
    if variant == "prequantized":  # written by minilora.save_pretrained; transformers loads the same folder
        bench.prepare("tinyllama-1.1b-nf4-minilora")
    params = {"precision": "nf4" if variant != "bf16" else "bf16", "prequantized": variant == "prequantized"}
    pairs = compare(f"load:{variant}", "load_checkpoint", params,
                    lambda p: report.load_rows(report.SECTIONS["load"], VARIANTS[variant], p))
    for stack, result in pairs.items():
        assert result["logits_finite"], f"{stack}: the loaded model gives non-finite logits"
