"""The code paths that only run on a GPU, checked on the CPU: which device a run resolves to (torchrun's
LOCAL_RANK), which kernel a layer picks on CUDA, and the checks that guard the CUDA-only bitsandbytes calls.
The kernels themselves run in ../shared/tools/gpu_check.sh on a real GPU."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

import minilora as ml
from minilora.device import resolve_device

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import common  # noqa: E402

train_module = importlib.import_module("minilora.train")  # minilora.train is the function


@pytest.fixture
def four_gpus(monkeypatch):
    """torch.cuda as a 4-GPU machine sees it (nothing is run on those devices)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    set_to = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: set_to.append(torch.device(d)))
    return set_to


# ---------------------------------------------------------------- device resolution

def test_the_default_device_is_cuda_when_available_else_cpu(monkeypatch, four_gpus):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device() == torch.device("cuda", 0) == resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("cuda:3") == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == torch.device("cpu") == resolve_device(None)


@pytest.mark.parametrize("resolve", [resolve_device, common.resolve_device], ids=["minilora", "examples"])
def test_under_torchrun_a_bare_cuda_is_this_ranks_gpu(monkeypatch, four_gpus, resolve):
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve(None) == torch.device("cuda", 2) == resolve("cuda")
    assert resolve("cuda:1") == torch.device("cuda", 1) and resolve("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "4")
    with pytest.raises(ValueError, match="LOCAL_RANK='4'.*4 visible"):
        resolve(None)


def test_train_and_the_examples_resolve_the_same_device_before_loading(monkeypatch, four_gpus):
    """train's device set-up (single process started by torchrun: WORLD_SIZE=1, LOCAL_RANK=1) gives the device
    the examples load the model on, and makes it the current CUDA device."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    device, rank, world, created = train_module._setup_distributed(ml.TrainConfig(device=None))
    assert (device, rank, world, created) == (torch.device("cuda", 1), 0, 1, False)
    assert four_gpus == [torch.device("cuda", 1)]
    assert common.resolve_device(None) == device
    args = common.common_parser("x", model="m", data="d", output_dir="o").parse_args([])
    assert common.train_config(args).device == "cuda:1"


def test_from_pretrained_loads_on_the_shared_default_device(monkeypatch):
    from minilora import loading

    asked = []

    def spy(device=None):
        asked.append(device)
        return torch.device("cpu")
    monkeypatch.setattr(loading, "resolve_device", spy)
    model_dir = Path(os.environ.get("MINILORA_TEST_MODELS", "/nonexistent")) / "all-MiniLM-L6-v2"
    if not (model_dir / "config.json").is_file():
        pytest.skip(f"no test checkpoint at {model_dir} (set MINILORA_TEST_MODELS)")
    model = ml.from_pretrained(model_dir)
    assert asked == [None] and next(model.parameters()).device.type == "cpu"
