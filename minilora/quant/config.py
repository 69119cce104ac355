"""QuantConfig: how from_pretrained quantizes, and which linear layers it quantizes."""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from minilora.models.base import PreTrainedModel, output_head_paths
from minilora.quant.bnb import check_blocksize

QUANT_TYPES = ("nf4", "fp4", "int8")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' 4-bit kernels accept
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# transformers keeps these modules out of bnb quantization (its `_keep_in_fp32_modules`); minilora does the
# same so checkpoints stay loadable both ways.
KEEP_DENSE_BY_MODEL_TYPE = {"t5": ("wo",)}


@dataclass
class QuantConfig:
    """How `from_pretrained(..., quantize=...)` quantizes linear layers.

    quant_type: "nf4" (QLoRA's 4-bit NormalFloat), "fp4" or "int8" (LLM.int8's row-wise int8 weights).
    double_quant / blocksize: 4-bit only: quantize the per-block scales again (~0.37 bit per weight less);
        weights per scale.
    compute_dtype: dtype of the matmuls; None means from_pretrained's `dtype`, else the checkpoint's (the
        rest of the model, and so the layer's output, stays fp32 unless `dtype` is given).
    skip_modules: linear layers kept dense, as transformers' `llm_int8_skip_modules` (a prefix on a module
        boundary, a regex, or a suffix). None keeps the output head dense; a list replaces that default, so
        name the head (["lm_head", ...]) to keep it dense, or pass [] to quantize it too. New task heads, a
        head tied to the embeddings and T5's `wo` always stay dense.
    int8_threshold: LLM.int8's outlier threshold, used where the int8 layer runs LLM.int8 (CUDA): input
        feature columns holding a value beyond it are multiplied in 16 bits, the rest in int8 (0: all int8).
        On the CPU the int8 layer dequantizes its weight instead and the threshold has no effect (see
        Int8Linear). Written to config.json as transformers' llm_int8_threshold.
    """

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype | None = None
    blocksize: int = 64
    skip_modules: list[str] | None = None
    int8_threshold: float = 6.0

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"QuantConfig.quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if isinstance(self.compute_dtype, str):
            self.compute_dtype = getattr(torch, self.compute_dtype.removeprefix("torch."), self.compute_dtype)
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"QuantConfig.compute_dtype must be None or one of {COMPUTE_DTYPES}, "
                             f"got {self.compute_dtype!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"QuantConfig.blocksize must be one of {BLOCKSIZES}, got {self.blocksize!r}")
        if self.blocksize == 32 and self.quant_type != "int8" and torch.cuda.is_available():
            try:  # CUDA is the default device: check now (quantize_linear checks again, knowing the device)
                check_blocksize(self.blocksize, torch.device("cuda"))
            except ImportError:
                pass  # no usable bitsandbytes: loading says so
        if isinstance(self.skip_modules, str):
            self.skip_modules = [self.skip_modules]
        if self.skip_modules is not None and not all(isinstance(s, str) and s for s in self.skip_modules):
            raise ValueError(f"QuantConfig.skip_modules must be a list of module names, got {self.skip_modules!r}")
        if not isinstance(self.int8_threshold, (int, float)) or self.int8_threshold < 0:
            raise ValueError(f"QuantConfig.int8_threshold must be a number >= 0, got {self.int8_threshold!r}")
        self.int8_threshold = float(self.int8_threshold)


def resolve_quant_config(quantize: str | QuantConfig | None, dtype: torch.dtype | None) -> QuantConfig | None:
    """The QuantConfig for `from_pretrained(quantize=..., dtype=...)`: a copy with compute_dtype filled in."""
    if quantize is None:
        return None
    if isinstance(quantize, str):
        if quantize.lower() not in QUANT_TYPES:
            raise ValueError(f"quantize must be one of {QUANT_TYPES}, a QuantConfig or None, got {quantize!r}")
        quantize = QuantConfig(quant_type=quantize.lower())
    elif not isinstance(quantize, QuantConfig):
        raise TypeError(f"quantize must be one of {QUANT_TYPES}, a QuantConfig or None, got {type(quantize).__name__}")
    return dataclasses.replace(quantize, compute_dtype=quantize.compute_dtype or dtype or torch.float32)


def _matches(path: str, patterns: Iterable[str]) -> bool:
    """transformers' rule for skip lists: `pattern` matches from the start up to a module boundary (as a
    regex), or is a suffix of the path."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    try:
        return any(re.match(rf"(?:{p}){boundary}", path) or path.endswith(p) for p in patterns)
    except re.error as e:
        raise ValueError(f"QuantConfig.skip_modules has an invalid pattern: {e}") from None


def _always_dense(path: str, model: nn.Module) -> bool:
    """Freshly initialised task heads, a head tied to the embeddings, and the model type's keep-dense modules."""
    if not isinstance(model, PreTrainedModel):
        return False
    if any((path + ".").startswith(p) for p in model.new_head_prefixes) or path + ".weight" in model.tied_weight_keys():
        return True
    return _matches(path, KEEP_DENSE_BY_MODEL_TYPE.get(model.model_type, ()))


def should_quantize(path: str, module: nn.Module, qconfig: QuantConfig, model: nn.Module) -> bool:
    """True for an `nn.Linear` at `path` in `model` that `qconfig` quantizes: all but new task heads, tied
    heads and the model type's keep-dense modules, less `skip_modules`, or less the output head when
    `skip_modules` is None (transformers' rule: a skip list replaces the default one)."""
    if not isinstance(module, nn.Linear) or _always_dense(path, model):
        return False
    if qconfig.skip_modules is None:
        return path not in output_head_paths(model)
    return not _matches(path, qconfig.skip_modules)
