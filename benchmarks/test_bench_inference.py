"""5. Greedy generation tokens/s with a LoRA adapter, unmerged and merged."""
from __future__ import annotations

from benchmarks import report


def test_generation(compare, bench):
    bench.prepare("smollm2-135m")
    params = {"precision": "bf16", "prompt_len": 32, "new_tokens": 32 if bench.quick else 64,
              "rounds": 2 if bench.quick else 3}
    label = f"{params['prompt_len']}-token prompt, {params['new_tokens']} new tokens"
    pairs = compare("generation", "generation", params,
                    lambda p: report.generation_rows(report.SECTIONS["generation"], label, p))
    for stack, result in pairs.items():
        assert len(result["unmerged_tokens"]) == len(result["merged_tokens"]) == params["new_tokens"], stack
