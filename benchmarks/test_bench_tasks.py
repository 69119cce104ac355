"""3. BERT-base-shaped classification and extractive QA (LoRA and QLoRA), and a flan-t5-base-shaped seq2seq
step (random weights of the real shapes)."""
from __future__ import annotations

import pytest

from benchmarks import report

CHECKPOINTS = {"sequence-classification": "bert-base-random", "question-answering": "bert-base-random",
               "seq2seq": "flan-t5-base-random"}
CASES = [("sequence-classification", "fp32"), ("sequence-classification", "nf4"),
         ("question-answering", "fp32"), ("question-answering", "nf4"), ("seq2seq", "fp32")]
SHAPES = {"sequence-classification": dict(batch_size=8, seq_len=128),
          "question-answering": dict(batch_size=8, seq_len=192),
          "seq2seq": dict(batch_size=4, seq_len=256, target_len=64)}


@pytest.mark.full_only
@pytest.mark.parametrize("task,precision", CASES)
def test_task_step(compare, bench, task, precision):
    bench.prepare(CHECKPOINTS[task])
    params = {"task": task, "precision": precision, "warmup": 1, "steps": 3, **SHAPES[task]}
    shape = ", ".join(f"{k.removesuffix('_size').replace('_len', '')} {v}" for k, v in SHAPES[task].items())
    label = f"{task}, {'LoRA fp32' if precision == 'fp32' else 'QLoRA NF4 bf16'} ({shape})"
    pairs = compare(f"task:{task}:{precision}", "task_step", params,
                    lambda p: report.train_rows(report.SECTIONS["tasks"], label, p))
    assert pairs["minilora"]["trainable"] == pairs["peft"]["trainable"]
    for stack, result in pairs.items():
        assert all(abs(loss) < 1e4 for loss in result["losses"]), f"{stack}: {result['losses']}"  # NaN fails
