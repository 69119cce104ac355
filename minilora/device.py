"""Which device a run uses when the user names none, or names a bare "cuda": one rule for loading, training
and the examples, so a model is loaded (and quantized) where it will train."""
from __future__ import annotations

import os

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as a torch.device. None means CUDA when available, else the CPU. A CUDA device without an
    index is this process's GPU: `cuda:LOCAL_RANK` under torchrun (which sets LOCAL_RANK), else the current
    CUDA device; so under torchrun every rank loads its model onto its own GPU, not all onto GPU 0."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device such as 'cuda', 'cuda:1', 'cpu' or 'mps', "
                         f"got {device!r}") from e
    if device.type != "cuda" or device.index is not None:
        return device
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None:
        return torch.device("cuda", torch.cuda.current_device())
    if not local_rank.isdigit() or int(local_rank) >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK={local_rank!r} names no visible CUDA device "
                         f"({torch.cuda.device_count()} visible): launch one process per GPU "
                         "(torchrun --nproc-per-node <= the GPU count)")
    return torch.device("cuda", int(local_rank))
