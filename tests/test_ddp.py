"""DDP under torchrun: 2 CPU processes (gloo) train to the same weights and losses as 1 process with the same
global batch; gradients are synchronised only at accumulation boundaries and only rank 0 writes files."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import main as train_main

HELPER = Path(__file__).with_name("train_helpers.py")
# adam_epsilon=1e-4: gradients agree to float rounding (an all-reduce sums in another order), but Adam's
# m / sqrt(v) blows a 1e-9 rounding difference up where v is ~0; a larger eps keeps the comparison at 1e-6.
ARGS = dict(gradient_accumulation_steps=2, num_epochs=2, learning_rate=1e-2, weight_decay=0.01, warmup_steps=1,
            logging_steps=1, save_steps=3, seed=7, n=24, adam_epsilon=1e-4)


def _losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records]


def test_two_gloo_processes_match_one_process(tmp_path):
    # 24 rows: 2 ranks x batch 2 x accumulation 2 = global batch 8, the same as 1 process x batch 4 x 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONWARNINGS": "ignore"}
    ddp_out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(HELPER),
           str(ddp_out), json.dumps({**ARGS, "batch_size": 2})]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-4000:]

    single_out = tmp_path / "single"
    train_main(str(single_out), json.dumps({**ARGS, "batch_size": 4}))

    ddp, single = load_file(ddp_out / "trained.safetensors"), load_file(single_out / "trained.safetensors")
    assert ddp.keys() == single.keys() and len(ddp) == 12  # q/v/down_proj x 2 layers x (A, B)
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], atol=1e-6, rtol=1e-5, msg=name)
    ddp_losses, single_losses = _losses(ddp_out), _losses(single_out)
    assert [s for s, _, _ in ddp_losses] == list(range(1, 7))  # rank 0 alone wrote each step once
    for (_, a, ga), (_, b, gb) in zip(ddp_losses, single_losses, strict=True):
        assert a == pytest.approx(b, abs=1e-6) and ga == pytest.approx(gb, abs=1e-6)  # global mean loss

    ddp_summary = json.loads((ddp_out / "summary.json").read_text())
    single_summary = json.loads((single_out / "summary.json").read_text())
    assert ddp_summary["global_step"] == single_summary["global_step"] == 6
    assert ddp_summary["total_flos"] == single_summary["total_flos"]  # tokens summed over ranks
    checkpoint = ddp_out / "checkpoint-6"
    assert {"rng_state_0.json", "rng_state_1.json"} <= {p.name for p in checkpoint.iterdir()}
    assert json.loads((checkpoint / "trainer_state.json").read_text())["world_size"] == 2
