"""QLoRA's frozen base layers: 4-bit NF4/FP4 and 8-bit (LLM.int8 weights) linear layers on bitsandbytes.

A quantized layer computes y = x @ dequantize(W).T + b in its compute dtype. The dense W exists only inside
a forward (and again inside its backward, for the input gradient), so memory stays that of the packed
weights. W never gets a gradient; inputs (and a bias set to train) do. bitsandbytes does all (de)quantizing.

State dicts use the keys bitsandbytes' Linear4bit / Linear8bitLt write (and transformers reads):
    4-bit: weight (packed uint8), weight.absmax, weight.quant_map, [weight.nested_absmax,
           weight.nested_quant_map,] weight.quant_state.bitsandbytes__nf4 (JSON: shape, blocksize, ...)
    8-bit: weight (int8 (out, in)), SCB (fp32 row absmax), weight_format (0: row-major)
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from minilora.ops import gemm
from minilora.ops.checkpointed import saves_are_recomputed
from minilora.quant import format as quant_format
from minilora.quant.bnb import import_bitsandbytes, check_blocksize
from minilora.quant.config import COMPUTE_DTYPES, QuantConfig

# --------------------------------------------------------------------------------------------------------
# The layers


class _FrozenLinearFn(torch.autograd.Function):
    """y = x @ W.T + b with W = layer.dequantize(x.dtype), dequantized again in backward instead of saved.

    What bnb.matmul_4bit computes on CPU, for both layer types, without its per-call checks. Saving W for
    backward would skip one dequantization but keep a dense copy of every quantized weight alive until
    backward: not worth it for QLoRA, whose point is memory. Inside a gradient-checkpointed block W is saved
    (`ops.checkpointed`): the recompute just made it, and it lives only during that block's backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.layer, weight = layer, layer.dequantize(x.dtype)
        if saves_are_recomputed():
            ctx.save_for_backward(weight)
        return gemm.linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            saved = ctx.saved_tensors
            weight = saved[0] if saved else ctx.layer.dequantize(grad_out.dtype)
            grad_x = gemm.matmul(grad_out, weight)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_bias


# Devices where the layers call bitsandbytes' own matmul kernels (see NF4Linear / Int8Linear.uses_bnb_matmul);
# elsewhere they dequantize the weight and multiply densely (_FrozenLinearFn).
BNB_MATMUL_DEVICES = ("cuda",)
DECODE_MAX_ROWS = 16  # 4-bit products of at most this many rows without gradients count as decoding


class QuantizedLinear(nn.Module):
    """What both layer types share: frozen packed weight, optional bias, forward through _FrozenLinearFn or,
    where `uses_bnb_matmul` says so, bitsandbytes' own matmul."""

    in_features: int
    out_features: int
    quant_type: str
    state_names: tuple[str, ...] = ("weight",)  # this layer's own state_dict entries, besides "weight.*"

    def __init__(self, compute_dtype: torch.dtype | None):
        super().__init__()
        self.compute_dtype = compute_dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        h = x.to(dtype)
        if self.uses_bnb_matmul(h, bias):
            return self.bnb_matmul(h, bias).to(x.dtype)
        return _FrozenLinearFn.apply(h, self, bias).to(x.dtype)

    def uses_bnb_matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> bool:
        return False

    def bnb_matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The packed weight and its quantization state are one unit: rebuild both (no re-quantization).
        own = (*self.state_names, "bias")
        tensors = {k[len(prefix):]: v for k, v in state_dict.items()
                   if k.startswith(prefix) and (k[len(prefix):] in own or k[len(prefix):].startswith("weight."))}
        if "weight" not in tensors:
            missing_keys.extend(prefix + n for n in own if n != "weight_format" and getattr(self, n) is not None)
            return
        if (self.bias is None) != ("bias" not in tensors):
            (missing_keys if self.bias is not None else unexpected_keys).append(prefix + "bias")
            return
        try:
            loaded = load_prequantized_linear(tensors, self.in_features, self.out_features,
                                              QuantConfig(self.quant_type), self.weight.device, prefix)
        except (KeyError, ValueError) as e:
            error_msgs.append(str(e))
            return
        for name in self.state_names:
            if name != "weight_format":
                setattr(self, name, getattr(loaded, name))
        if self.bias is not None:
            with torch.no_grad():
                self.bias.copy_(loaded.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, compute_dtype={self.compute_dtype}")


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` is one of minilora's quantized linear layers (NF4 / FP4 / int8)."""
    return isinstance(module, QuantizedLinear)


class NF4Linear(QuantizedLinear):
    """A frozen linear layer stored in 4 bits (NF4, or FP4 when `quant_type == "fp4"`).

    `weight` is a bitsandbytes `Params4bit`: the packed (out*in/2, 1) uint8 data plus its `quant_state`
    (per-block absmax scales, themselves 8-bit quantized with double quantization).
    Decoding on CUDA (at most DECODE_MAX_ROWS rows, no gradient) runs `bitsandbytes.matmul_4bit`, whose 4-bit
    GEMV / fused kernels read the packed weight instead of dequantizing all of it at every token; training,
    prefill and every CPU product dequantize the weight and run one dense GEMM (fast on CPU).
    """

    def __init__(self, weight: nn.Parameter, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__(compute_dtype)
        self.weight = weight
        self.bias = frozen_parameter(bias)
        self.out_features, self.in_features = weight.quant_state.shape

    @property
    def quant_type(self) -> str:
        return self.weight.quant_state.quant_type

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight in `dtype` (default: the compute dtype)."""
        state = self.weight.quant_state
        absmax = state.absmax
        if state.nested:
            absmax = import_bitsandbytes().functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        # The op directly (not functional.dequantize_4bit): it writes `dtype` without an fp32 detour.
        return torch.ops.bitsandbytes.dequantize_4bit.default(
            self.weight.data, absmax.float(), state.blocksize, state.quant_type, state.shape,
            dtype or self.compute_dtype or state.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.weight.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def uses_bnb_matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> bool:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
        return decodes_with_matmul_4bit(x.device, x.numel() // max(x.shape[-1], 1), needs_grad)

    def bnb_matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # Linear4bit's call: the transposed packed weight (bitsandbytes >= 0.46 reads both orientations).
        return import_bitsandbytes().matmul_4bit(x, self.weight.t(), quant_state=self.weight.quant_state, bias=bias)


class Int8Linear(QuantizedLinear):
    """A frozen linear layer stored as LLM.int8 weights: int8 (out, in) rows `weight` and fp32 row scales
    `SCB` (W ~= weight * SCB / 127).

    Which product runs depends on the device, as in bitsandbytes' Linear8bitLt (what transformers'
    load_in_8bit runs):
    - CUDA: LLM.int8 proper (`bitsandbytes.matmul`): the input rows are quantized to int8 too, except the
      feature columns holding a value beyond `threshold` (QuantConfig.int8_threshold), which are multiplied
      in 16 bits; the int8 product is rescaled. Inputs are quantized through fp16.
    - elsewhere (CPU): the weight is dequantized (weight * SCB / 127) and multiplied densely in the compute
      dtype, bit for bit bitsandbytes' CPU training path; exact for the stored weights, `threshold` unused.
    The input gradient is always the dense product with the dequantized weight.
    """

    quant_type = "int8"
    state_names = ("weight", "SCB", "weight_format")

    def __init__(self, weight: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None, threshold: float = 6.0):
        super().__init__(compute_dtype)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = frozen_parameter(bias)
        self.register_buffer("SCB", scb.float())
        self.out_features, self.in_features = weight.shape
        self.threshold = float(threshold)

    def uses_bnb_matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> bool:
        return x.device.type in BNB_MATMUL_DEVICES

    def bnb_matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        bnb = import_bitsandbytes()
        state = bnb.MatmulLtState()  # fresh per call: bitsandbytes keeps per-call outlier columns in it
        state.CB, state.SCB, state.threshold = self.weight.data, self.SCB, self.threshold
        state.has_fp16_weights, state.is_training = False, False  # is_training=False: LLM.int8 on any device
        # 2-D: bitsandbytes' bias gradient sums over the first dimension only
        out = bnb.matmul(x.reshape(-1, x.shape[-1]), self.weight, bias=bias, state=state)
        return out.reshape(*x.shape[:-1], self.out_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight in `dtype` (default: the compute dtype, else fp32)."""
        # bitsandbytes' own formula (MatMul8bitFp), so outputs match a transformers int8 model bit for bit.
        dtype = dtype or self.compute_dtype or torch.float32
        return self.weight.to(dtype).mul_(self.SCB.unsqueeze(1).mul(1.0 / 127.0))

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half() would cast the fp32 row scales too; they only follow the device.
        scb = self._buffers.pop("SCB")
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["SCB"] = scb.to(self.weight.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)  # bnb's "row" layout

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold:g}"


def decodes_with_matmul_4bit(device: torch.device, rows: int, needs_grad: bool) -> bool:
    """Whether a 4-bit product of `rows` input rows goes through bitsandbytes.matmul_4bit: on CUDA, without
    gradients, for at most DECODE_MAX_ROWS rows (decoding a token per sequence)."""
    return device.type in BNB_MATMUL_DEVICES and not needs_grad and rows <= DECODE_MAX_ROWS


def frozen_parameter(bias: torch.Tensor | None) -> nn.Parameter | None:
    return None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)


# --------------------------------------------------------------------------------------------------------
# Building layers: from a dense weight, or from a checkpoint's packed tensors


QUANTIZE_CHUNK_ELEMENTS = 1 << 18  # weights per bitsandbytes call on the CPU: its temporaries stay ~5 MB
# Elsewhere (GPUs): few, large calls (most matrices in one), not thousands of small synchronous copies.
DEVICE_QUANTIZE_CHUNK_ELEMENTS = 1 << 26


def quantize_linear(weight: torch.Tensor, bias: torch.Tensor | None, qconfig: QuantConfig,
                    device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen NF4Linear / Int8Linear holding `weight` (out, in) quantized on `device` (default: its own).

    `weight` is a tensor, or anything with `.shape`, `.dtype` and row ranges `weight[a:b]` as tensors (a
    checkpoint tensor read lazily). It is quantized a few rows at a time on the CPU (a few large pieces on a
    GPU), cast to `dtype` (default: its own) on the way: bitsandbytes' temporaries stay small and no
    full-precision copy of the matrix is made. The result is bit for bit what one bitsandbytes call on the
    whole matrix gives.
    """
    shape = tuple(weight.shape)
    if len(shape) != 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"quantize_linear needs a floating (out, in) weight, got {weight.dtype} {shape}")
    if bias is not None and tuple(bias.shape) != shape[:1]:
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({shape[0]},) for the weight")
    device = torch.device(device) if device is not None else getattr(weight, "device", torch.device("cpu"))
    if qconfig.quant_type != "int8":
        check_blocksize(qconfig.blocksize, device)
    dtype = dtype or weight.dtype
    if dtype not in COMPUTE_DTYPES:
        dtype = torch.float32
    bias = None if bias is None else bias.detach().to(device, dtype)
    four_bit = qconfig.quant_type != "int8"
    # A chunk of whole rows holding whole 4-bit blocks, so blocks (and packed byte pairs) never straddle chunks.
    rows_step = qconfig.blocksize // math.gcd(shape[1], qconfig.blocksize) if four_bit else 1
    chunk = QUANTIZE_CHUNK_ELEMENTS if device.type == "cpu" else DEVICE_QUANTIZE_CHUNK_ELEMENTS
    rows = max(rows_step, chunk // max(shape[1], 1) // rows_step * rows_step)
    # To CUDA, non_blocking: rows read into pinned memory (a checkpoint tensor bound there) copy asynchronously
    to_cuda = device.type == "cuda"
    chunks = (weight[a:a + rows].detach().to(device, dtype, non_blocking=to_cuda) for a in range(0, shape[0], rows))
    if not four_bit:
        return Int8Linear(*_quantize_int8(chunks, shape, device), bias, qconfig.compute_dtype, qconfig.int8_threshold)
    return NF4Linear(_quantize_4bit(chunks, shape, dtype, qconfig, device), bias, qconfig.compute_dtype)


def _quantize_int8(chunks: Iterable[torch.Tensor], shape: tuple[int, int],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    int8_weight = torch.empty(shape, dtype=torch.int8, device=device)
    scb = torch.empty(shape[0], dtype=torch.float32, device=device)
    row = 0
    for chunk in chunks:
        # Through fp16 like bnb's Int8Params, so the int8 rows equal what transformers' load_in_8bit stores.
        int8_rows, chunk_scb, _ = import_bitsandbytes().functional.int8_vectorwise_quant(chunk.to(torch.float16))
        int8_weight[row:row + len(chunk)], scb[row:row + len(chunk)] = int8_rows, chunk_scb
        row += len(chunk)
    return int8_weight, scb


def _quantize_4bit(chunks: Iterable[torch.Tensor], shape: tuple[int, int], dtype: torch.dtype,
                   qconfig: QuantConfig, device: torch.device) -> nn.Parameter:
    """bitsandbytes.functional.quantize_4bit, one row chunk at a time: the same packed bytes and state."""
    bnb = import_bitsandbytes()
    n, blocksize = shape[0] * shape[1], qconfig.blocksize
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=device)
    done = 0
    for chunk in chunks:
        chunk_packed, chunk_absmax = torch.ops.bitsandbytes.quantize_4bit.default(
            chunk, blocksize, qconfig.quant_type, torch.uint8)
        packed[done // 2:done // 2 + len(chunk_packed)] = chunk_packed.view(-1, 1)
        absmax[done // blocksize:done // blocksize + len(chunk_absmax)] = chunk_absmax
        done += chunk.numel()
    offset = state2 = None
    if qconfig.double_quant:  # the per-block scales, 8-bit quantized in blocks of 256 around their mean
        offset = absmax.mean()
        absmax, state2 = bnb.functional.quantize_blockwise(absmax - offset, blocksize=256)
    state = bnb.functional.QuantState(
        absmax=absmax, shape=torch.Size(shape), code=bnb.functional.get_4bit_type(qconfig.quant_type, device=device),
        blocksize=blocksize, quant_type=qconfig.quant_type, dtype=dtype, offset=offset, state2=state2)
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=blocksize,
                             compress_statistics=qconfig.double_quant, quant_type=qconfig.quant_type,
                             bnb_quantized=True)


def load_prequantized_linear(tensors: dict[str, torch.Tensor], in_features: int, out_features: int,
                             qconfig: QuantConfig, device: torch.device | str | None = None,
                             prefix: str = "") -> nn.Module:
    """Rebuild a quantized layer from the tensors a quantized model's state_dict wrote under its prefix
    ("weight", "weight.absmax", ..., "bias" / "weight", "SCB", "weight_format", "bias"); no re-quantization.

    `prefix` (e.g. "model.layers.0.self_attn.q_proj.") only makes error messages name the full keys.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if qconfig.quant_type == "int8":
        layer = Int8Linear(*quant_format.read_int8(tensors, in_features, out_features, device, prefix),
                           compute_dtype=qconfig.compute_dtype, threshold=qconfig.int8_threshold)
    else:
        layer = NF4Linear(quant_format.read_4bit(tensors, in_features, out_features, qconfig.quant_type, device,
                                                 prefix), compute_dtype=qconfig.compute_dtype)
    if "bias" in tensors:
        if tensors["bias"].shape != (out_features,):
            raise ValueError(f"{prefix}bias has shape {tuple(tensors['bias'].shape)}, expected ({out_features},)")
        layer.bias = frozen_parameter(tensors["bias"].to(device))
    return layer
