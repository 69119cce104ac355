"""Packing vs padding on guanaco_llama2_1k's real length distribution: padding fraction and training tokens/s.

minilora only (peft has no packing to compare with). SmolLM2-135M-Instruct with LoRA r=16 on all linear
layers, fp32, rows of at most `MAX_LENGTH` tokens, batch 4, AdamW. "padded": one conversation per row, each
batch padded to its longest row; "packed": `packing=True`, whole conversations side by side in each row.
Tokens/s counts real (non-padding) tokens, so the two are comparable. Each run's numbers go to
--benchmark-json (extra_info), to the terminal, and to benchmarks/results/packing.json.

    pytest benchmarks/test_bench_packing.py --benchmark -s        # MINILORA_BENCH_DEVICE=cuda on a GPU
"""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
import torch

from benchmarks import assets

MAX_LENGTH, BATCH_SIZE, WARMUP_STEPS = 512, 4, 1
RESULTS = Path(__file__).with_name("results") / "packing.json"


def _batches(features: list[dict], batch_size: int, seed: int = 0) -> list[list[dict]]:
    order = list(range(len(features)))
    random.Random(seed).shuffle(order)
    return [[features[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]


def padding_fraction(batches: list[list[dict]]) -> float:
    """Share of the batch tensors' positions that are padding, over the whole epoch."""
    real = sum(len(f["input_ids"]) for batch in batches for f in batch)
    total = sum(len(batch) * max(len(f["input_ids"]) for f in batch) for batch in batches)
    return 1 - real / total


def _tokens_per_second(model, batches: list[list[dict]], collate, device: torch.device, steps: int) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    tokens, seconds = 0, 0.0
    for i, features in enumerate(batches[:WARMUP_STEPS + steps]):
        batch = {k: v.to(device) for k, v in collate(features).items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= WARMUP_STEPS:
            tokens, seconds = tokens + int(batch["attention_mask"].sum()), seconds + time.perf_counter() - start
    return tokens / seconds


def test_packing_vs_padding(benchmark):
    import minilora as ml
    from minilora.data import Collator, causal_lm_dataset, load_records

    model_dir, data_root = assets.real_model_dir("smollm2-135m"), assets.shared_data_dir()
    if model_dir is None or data_root is None or not (data_root / "guanaco_llama2_1k").is_dir():
        pytest.skip("needs the real SmolLM2-135M-Instruct (shared/tools/make_models.sh) and shared/data")
    data_dir = data_root / "guanaco_llama2_1k"
    device = torch.device(os.environ.get("MINILORA_BENCH_DEVICE", "cpu"))
    steps = int(os.environ.get("MINILORA_BENCH_PACKING_STEPS", "3" if device.type == "cpu" else "20"))
    tokenizer = ml.load_tokenizer(model_dir)
    rows = load_records(data_dir, split="train")
    collate = Collator(pad_token_id=tokenizer.eos_token_id)

    def measure() -> dict:
        results = {}
        for variant in ("padded", "packed"):
            features = causal_lm_dataset(rows, tokenizer, max_length=MAX_LENGTH, packing=variant == "packed")
            batches = _batches(features, BATCH_SIZE)
            torch.manual_seed(0)
            model = ml.from_pretrained(model_dir, dtype=torch.float32, device=device)
            ml.apply_lora(model, ml.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
            results[variant] = {"rows": len(features), "batches": len(batches),
                                "padding_fraction": round(padding_fraction(batches), 4),
                                "tokens_per_s": round(_tokens_per_second(model, batches, collate, device, steps), 1)}
        return {"device": str(device), "max_length": MAX_LENGTH, "batch_size": BATCH_SIZE, "timed_steps": steps,
                **results}

    result = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\npacking vs padding on guanaco_llama2_1k (max_length {MAX_LENGTH}, batch {BATCH_SIZE}, {device}):")
    for variant in ("padded", "packed"):
        r = result[variant]
        print(f"  {variant:6s}: {r['rows']} rows, {r['batches']} steps/epoch, "
              f"padding {100 * r['padding_fraction']:.1f}%, {r['tokens_per_s']:.0f} real tokens/s")
    assert result["packed"]["padding_fraction"] < result["padded"]["padding_fraction"]
    assert result["packed"]["batches"] < result["padded"]["batches"]
