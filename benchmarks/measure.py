"""How the cases measure: thread count, peak memory (RSS on CPU, allocator peak on CUDA) and step timing.

Peak RSS is the kernel's high-water mark (VmHWM). Writing "5" to /proc/self/clear_refs resets it, so a
case can measure loading and training separately inside one process.
"""
from __future__ import annotations

import os
import re
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Both stacks get the same intra-op threads: 2, the cores of the reference machine (override for others).
THREADS = int(os.environ.get("MINILORA_BENCH_THREADS", "2"))


def setup(device: str, seed: int = 0) -> torch.device:
    """Pin threads and seeds at the start of every case process; returns the torch device."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    return torch.device(device)


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match[1]) if match else None


def rss_bytes() -> int:
    """Current resident set size of this process."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size since start (or since the last `reset_peak_memory`)."""
    kib = _status_kib("VmHWM")
    if kib is None:  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS) cannot be reset
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


def reset_peak_memory(device: torch.device) -> bool:
    """Restart peak tracking from the current usage; False when the platform cannot (the peak stays
    cumulative since process start)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of the run so far: CUDA allocator peak on a GPU, else peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def memory_kind(device: torch.device) -> str:
    return "peak CUDA memory" if device.type == "cuda" else "peak RSS"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(wall seconds, result) of one call, synchronized on accelerators."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def median(values: list[float]) -> float:
    return statistics.median(values)


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.dtype, t.shape)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    # bitsandbytes keeps 4-bit scales outside the parameters (quant_state)
    for m in module.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            total += _quant_state_bytes(state)
    return total


def _quant_state_bytes(state) -> int:
    parts = [state.absmax, state.code]
    nested = getattr(state, "state2", None)
    if nested is not None:
        parts += [nested.absmax, nested.code]
    return sum(t.numel() * t.element_size() for t in parts)


def matmul_flops_per_s(rows: int, inner: int, cols: int, device: torch.device, repeats: int = 5) -> float:
    """FLOP/s of a (rows, inner) @ (inner, cols) bf16 product as it runs here, best of `repeats`: PyTorch's bf16
    kernel where the CPU has fast bf16 instructions (or on a GPU), else fp32, which is what minilora's bf16
    products run in there (`minilora.ops.gemm`). The peak that MFU is measured against, taken in the case's run."""
    from minilora.ops import gemm

    dtype = gemm.gemm_dtype(torch.bfloat16, device, rows)
    a = torch.randn(rows, inner, device=device, dtype=dtype)
    b = torch.randn(inner, cols, device=device, dtype=dtype)
    best = min(timed(lambda: a @ b, device)[0] for _ in range(repeats + 1))  # the first call warms up
    return 2 * rows * inner * cols / best
