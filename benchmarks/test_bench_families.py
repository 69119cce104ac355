"""One parity row per decoder family (Qwen2/3, Mistral, Gemma 1/2/3, Phi-3, and Llama): the tiny random
checkpoints of tests/test_families.py (sliding windows, soft-capping, partial rotary, longrope...) loaded by
minilora and by transformers, side by side: the largest fp32 logit difference with left padding, whether
20 greedy tokens agree, and one LoRA training step's time in each stack. Rows go to --benchmark-json
(extra_info), the terminal and benchmarks/results/families.{json,md}.

    pytest benchmarks/test_bench_families.py --benchmark -s
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

RESULTS = Path(__file__).with_name("results") / "families"


def _lora_step_s(model, ids, mask) -> float:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for _ in range(3):  # the first is warm-up
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def test_family_parity(benchmark, tmp_path):
    peft = pytest.importorskip("peft")
    import minilora as ml
    from tests.test_families import FAMILIES, hf_model, left_padded, load_hf

    def measure() -> dict:
        rows = {}
        for family in FAMILIES:
            folder = tmp_path / family
            hf_model(family).save_pretrained(folder)
            ours, theirs = ml.from_pretrained(folder, dtype=torch.float32), load_hf(folder)
            ids, mask = left_padded()
            with torch.no_grad():
                diff = (ours(ids, attention_mask=mask).logits - theirs(ids, attention_mask=mask).logits)
                diff = diff[mask.bool()].abs().max().item()  # padding positions aside
                prompt = ids[:1, -6:]
                same = torch.equal(ml.generate(ours, prompt, max_new_tokens=20, eos_token_id=[]),
                                   theirs.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None))
            targets = ["q_proj", "v_proj"] if family != "phi3" else ["qkv_proj"]
            ml.apply_lora(ours, ml.LoraConfig(r=8, lora_alpha=16, target_modules=targets))
            theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets))
            rows[family] = {"max_logit_diff": diff, "greedy_20_equal": same,
                            "lora_step_s_minilora": _lora_step_s(ours, ids, mask),
                            "lora_step_s_peft": _lora_step_s(theirs, ids, mask)}
        return rows

    rows = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(rows)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| family | max \\|logit diff\\| (fp32) | 20 greedy tokens equal | LoRA step minilora / peft (ms) |",
             "|---|---|---|---|"]
    lines += [f"| {f} | {r['max_logit_diff']:.1e} | {r['greedy_20_equal']} | "
              f"{1e3 * r['lora_step_s_minilora']:.1f} / {1e3 * r['lora_step_s_peft']:.1f} |" for f, r in rows.items()]
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    for family, row in rows.items():
        assert row["max_logit_diff"] < 1e-4 and row["greedy_20_equal"], family
