"""bitsandbytes, imported on first use with its version checked: only quantized models need it."""
from __future__ import annotations

import functools
import logging
import re

import torch

MIN_BITSANDBYTES = (0, 46)  # the first with torch.ops.bitsandbytes.*, which the layers call directly
MIN_BITSANDBYTES_BLOCKSIZE_32_CUDA = (0, 49)  # CUDA 4-bit kernels take blocksize 32 from 0.49 on


@functools.cache
def import_bitsandbytes():
    """bitsandbytes, imported on first use (slow to import; only quantized models need it), version checked."""
    # On CPUs with AVX512-BF16, bitsandbytes warns at import that an optional inference-only kernel package
    # is missing. minilora never takes that path (see _FrozenLinearFn), so the warning is noise.
    cpu_ops_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops_log.level
    cpu_ops_log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
        import bitsandbytes.functional
    except ImportError as e:
        raise ImportError(f"quantized models (QLoRA, int8) need bitsandbytes >= {_dotted(MIN_BITSANDBYTES)}: "
                          f"pip install 'bitsandbytes>={_dotted(MIN_BITSANDBYTES)}' ({e})") from e
    finally:
        cpu_ops_log.setLevel(level)
    if bnb_version(bitsandbytes) < MIN_BITSANDBYTES:
        raise ImportError(f"minilora's quantized layers need bitsandbytes >= {_dotted(MIN_BITSANDBYTES)} (they call "
                          f"torch.ops.bitsandbytes.*), found {bitsandbytes.__version__} at {bitsandbytes.__file__}: "
                          f"pip install -U 'bitsandbytes>={_dotted(MIN_BITSANDBYTES)}'")
    # LLM.int8 casts bf16 activations to fp16 to quantize them, and logs so at every call: minilora asks for it.
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(
        lambda record: "inputs will be cast from" not in record.getMessage())
    return bitsandbytes


def bnb_version(module=None) -> tuple[int, ...]:
    """bitsandbytes' (major, minor) version, e.g. (0, 46) for "0.46.1" or "0.46.0.dev0"."""
    version = (module or import_bitsandbytes()).__version__
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def check_blocksize(blocksize: int, device: torch.device) -> None:
    """Raise a ValueError naming QuantConfig.blocksize when the installed bitsandbytes cannot use it on `device`."""
    if blocksize == 32 and device.type == "cuda" and bnb_version() < MIN_BITSANDBYTES_BLOCKSIZE_32_CUDA:
        needed = _dotted(MIN_BITSANDBYTES_BLOCKSIZE_32_CUDA)
        raise ValueError(f"QuantConfig.blocksize=32 needs bitsandbytes >= {needed} on CUDA (earlier CUDA kernels "
                         f"take 64..4096), found {import_bitsandbytes().__version__}: use blocksize=64 or upgrade "
                         "bitsandbytes")
