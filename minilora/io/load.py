"""Load Hugging Face checkpoint folders into minilora models.

Loading builds the model on the meta device (no memory), then walks it module by module. A tensor used as
stored (same dtype, CPU) is mapped from the file copy-on-write; one that changes dtype or device is read
and converted a few rows at a time into its final buffer, so peak memory stays near the size of the
finished model. With `quantize=`, each linear layer is quantized while its weight is read: neither the
full-precision model nor its mapped file pages ever sit in memory.
"""
from __future__ import annotations

import ctypes
import functools
import os
import re
import warnings
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from minilora.device import resolve_device
from minilora.io import config_checks as load_checks
from minilora.io.config_checks import MAX_NUM_LABELS, key_list
from minilora.io.hub import resolve_model_dir
from minilora.io.json_file import read_json_object
from minilora.io.safetensors_file import (  # noqa: F401 (re-exported: callers import them from minilora.io.load)
    Checkpoint, CheckpointError, LazyTensor, SafetensorsFile, load_safetensors, save_safetensors)
from minilora.models import model_classes
from minilora.models.base import in_unbuilt_part, stored_key_to_path
from minilora import quant
from minilora.quant import QuantConfig, format as quant_format

# Checkpoint tensors every HF architecture recomputes from the config (old checkpoints saved them).
ALWAYS_IGNORED_KEYS = (r"(^|\.)position_ids$", r"(^|\.)rotary_emb\.inv_freq$", r"(^|\.)inv_freq$")


def from_pretrained(path_or_id: str | os.PathLike, task: str | None = None, num_labels: int | None = None,
                    dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
                    revision: str | None = None, quantize: str | QuantConfig | None = None) -> nn.Module:
    """Load a Hugging Face checkpoint (local folder or hub id) into the matching minilora model class.

    task: "causal-lm" | "seq2seq" | "base" | "sequence-classification" | "question-answering"; None picks
        it from config.json `architectures`, else the model type's default.
    num_labels: overrides the config's label count (a fresh classification head is created when the
        checkpoint has none; a checkpoint head of another size is an error).
    dtype: dtype of the floating-point weights. None (or "auto") keeps the checkpoint's, like
        transformers v5: config.json `dtype`/`torch_dtype`, else the dtype most of the stored weights have.
        A quantized model with dtype=None gets QLoRA's precision instead: embeddings, norms, biases and the
        output head (so the residual stream) in fp32, the quantized layers computing in the checkpoint's
        dtype (unless `QuantConfig.compute_dtype` says otherwise), as peft's `prepare_model_for_kbit_training`.
    device: where the weights are materialised (and quantized), one tensor at a time. None: CUDA when
        available (`cuda:LOCAL_RANK` under torchrun), else the CPU: `ml.resolve_device`, the same default as
        `TrainConfig.device`, so a model loads where it will train. Pass "cpu" to load on the CPU.
    quantize: "nf4" | "fp4" | "int8" | a `QuantConfig`: quantize the linear layers while loading (QLoRA).
        A folder saved from a quantized model (config.json has `quantization_config`) loads quantized
        without it.
    Returns the model in eval mode (like transformers), with `model.name_or_path = path_or_id`.
    Weights used as stored are mapped copy-on-write from the files: rewriting those files while the model is in
    use changes the pages not read yet (as with safetensors' and transformers' mapped loading).
    """
    model_dir = resolve_model_dir(path_or_id, revision)
    config_dict = read_json_object(model_dir / "config.json")
    if num_labels is not None:
        set_num_labels(config_dict, num_labels)
    config_class, model_class = model_classes(config_dict, task)
    device = resolve_device(device)
    with Checkpoint(model_dir) as checkpoint:
        config = _checked_config(config_class, config_dict, checkpoint, model_dir / "config.json", model_class)
        dtype, compute_dtype = _resolve_dtype(dtype, config_dict, checkpoint,
                                              quantize is not None or "quantization_config" in config_dict)
        qconfig, prequantized = _resolve_quantization(quantize, config_dict, compute_dtype)
        with torch.device("meta"), _no_random_init():
            model = model_class(config)
        _load_weights(model, checkpoint, config_dict, dtype, device, qconfig, prequantized)
    model.init_non_persistent_buffers(device)
    unloaded = [name for name, t in [*model.named_parameters(remove_duplicate=False),
                                     *model.named_buffers(remove_duplicate=False)] if t.is_meta]
    if unloaded:
        raise RuntimeError(f"{model_class.__name__} left tensors unset after loading (a model class bug: "
                           f"not in the checkpoint, not tied, not computed): {', '.join(unloaded)}")
    model.name_or_path = str(path_or_id)
    if qconfig is not None:
        model.quant_config = qconfig
    return model.eval()


@contextmanager
def _no_random_init():
    """torch.nn.init's initialisers as no-ops while a model is built on the meta device, where they are wasted
    work (and `normal_` on meta imports torch._dynamo, slow on a first load). Like transformers'
    `no_init_weights`; new heads are initialised later by `init_weights`."""
    saved = {n: f for n, f in vars(nn.init).items() if n.endswith("_") and not n.startswith("_")}
    for n in saved:
        setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def _checked_config(config_class: type, config_dict: dict, checkpoint: Checkpoint, source: Path,
                    model_class: type | None = None):
    """The model config, its values and layer count checked against the checkpoint (less the parts the model
    does not build) before any layer is built."""
    load_checks.check_config_dict(config_class, config_dict, source)
    try:
        config = config_class.from_dict(config_dict)
    except (ValueError, TypeError, KeyError) as e:  # the config class's own checks: name the file
        raise type(e)(f"{source}: {e}") from None
    load_checks.check_against_checkpoint(config, checkpoint, source, model_class)
    return config


def set_num_labels(config_dict: dict, num_labels: int) -> None:
    """Set config.json's label count, with fresh LABEL_i names unless its id2label already has that many."""
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or not 1 <= num_labels <= MAX_NUM_LABELS:
        raise ValueError(f"num_labels must be an int in [1, {MAX_NUM_LABELS}], got {num_labels!r}")
    config_dict["num_labels"] = num_labels
    if len(config_dict.get("id2label") or {}) != num_labels:  # HF names fresh labels LABEL_0, LABEL_1, ...
        config_dict["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        config_dict["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}


def _resolve_dtype(dtype, config_dict: dict, checkpoint: Checkpoint,
                   quantized: bool) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the dense weights, default compute dtype of quantized layers).

    Both are `dtype` when given, else the checkpoint's; except that a quantized model with dtype=None keeps
    its dense weights in fp32: in a bf16 residual stream the first LoRA updates are mostly rounded away."""
    requested = dtype
    if dtype in (None, "auto"):
        dtype = (config_dict.get("dtype") or config_dict.get("torch_dtype") or checkpoint.majority_float_dtype()
                 or torch.get_default_dtype())
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype (or its name, or 'auto'), got {dtype!r}")
    if quantized and requested is None:
        return torch.float32, dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
    return dtype, dtype


def _resolve_quantization(quantize, config_dict: dict, dtype: torch.dtype):
    """(QuantConfig or None, whether the checkpoint already holds quantized weights)."""
    saved = config_dict.get("quantization_config")
    if quantize is None and saved is None:
        return None, False
    requested = quant.resolve_quant_config(quantize, dtype)
    if saved is None:
        return requested, False
    qconfig = quant.resolve_quant_config(quant_format.quant_config_from_dict(saved), dtype)  # fills compute_dtype
    if requested is not None and requested.quant_type != qconfig.quant_type:
        raise ValueError(f"the checkpoint is already quantized as {qconfig.quant_type} (config.json "
                         f"quantization_config) but quantize={quantize!r} asks for {requested.quant_type}: "
                         "drop the quantize argument")
    return qconfig, True


def _match_keys(model: nn.Module, checkpoint_keys: Iterable[str], model_keys: set[str], saved_architectures: list[str],
                loose_prefixes: tuple[str, ...] = ()) -> tuple[dict[str, str], list[str], list[str], list[str]]:
    """Map checkpoint keys to model keys: ({model key: checkpoint key}, dropped head keys, keys of parts the
    model does not build, unexpected keys).

    Stored keys are first renamed by the model's `checkpoint_renames`. A checkpoint of the bare base model (no
    `base_model_prefix.`) loads into a task class, and a task checkpoint into the base model. Tensors of
    another class's head (e.g. `cls.*` of BertForPreTraining) and of the model's `unbuilt_parts` are dropped
    with a warning; anything else unknown is unexpected.
    """
    renamed, unbuilt = {}, []
    for key in checkpoint_keys:
        if in_unbuilt_part(model, key):
            unbuilt.append(key)
        else:
            renamed[key] = stored_key_to_path(model, key)
    prefix = model.base_model_prefix + "."
    is_task_model = isinstance(getattr(model, model.base_model_prefix, None), nn.Module)
    prefixed = any(k.startswith(prefix) for k in renamed.values())
    ignored = [re.compile(p) for p in (*model.ignore_unexpected_keys, *ALWAYS_IGNORED_KEYS)]
    from_other_class = bool(saved_architectures) and type(model).__name__ not in saved_architectures

    def outside_base(key: str, target: str) -> bool:
        return not target.startswith(prefix) if is_task_model else prefixed and not key.startswith(prefix)

    mapping, dropped, unexpected = {}, [], []
    for stored, key in renamed.items():
        target = key
        if is_task_model and not prefixed and key not in model_keys:
            target = prefix + key
        elif not is_task_model and prefixed and key.startswith(prefix):
            target = key[len(prefix):]
        if target in model_keys or target.startswith(loose_prefixes):
            mapping[target] = stored
        elif any(p.search(key) or p.search(target) for p in ignored):
            continue
        elif from_other_class and outside_base(key, target):
            dropped.append(stored)
        else:
            unexpected.append(stored)
    return mapping, dropped, unbuilt, unexpected


def _load_weights(model: nn.Module, checkpoint: Checkpoint, config_dict: dict, dtype: torch.dtype,
                  device: torch.device, qconfig, prequantized: bool) -> None:
    """Check the checkpoint against the meta model, then materialise it module by module."""
    state = model.state_dict(keep_vars=True)  # meta tensors: names, shapes, and which buffers persist
    linears = {path for path, m in model.named_modules() if isinstance(m, nn.Linear)}
    # A pre-quantized layer stores other tensors (weight.absmax, SCB, ...): accept anything under a linear layer.
    mapping, dropped, unbuilt, unexpected = _match_keys(model, checkpoint.keys(), set(state),
                                                        config_dict.get("architectures") or [],
                                                        tuple(p + "." for p in linears) if prequantized else ())
    quantized = _quantized_paths(model, qconfig, prequantized, mapping, linears)
    packed = tuple(p + "." for p in quantized) if prequantized else ()
    unexpected += [mapping.pop(k) for k in [k for k in mapping if k not in state and not k.startswith(packed)]]
    tied = set(model.tied_weight_keys())
    missing = [k for k in state if k not in mapping and k not in tied and not k.startswith(packed)]
    # New task heads, and modules transformers would initialise too when a checkpoint lacks them (a pooler).
    fresh = [re.compile(p) for p in model.init_if_missing]
    new_head = [k for k in missing if k.startswith(tuple(model.new_head_prefixes)) or any(p.search(k) for p in fresh)]
    _check_keys(model, checkpoint, state, mapping, [k for k in missing if k not in new_head], unexpected, packed)
    load_checks.check_dtypes(state, mapping, checkpoint, packed)
    if dropped:
        warnings.warn(f"{checkpoint.folder}: ignored tensors of a head {type(model).__name__} does not have: "
                      f"{key_list(dropped)}", stacklevel=3)
    if unbuilt:
        warnings.warn(f"{checkpoint.folder}: {type(model).__name__} builds the language model only; the "
                      f"{len(unbuilt)} tensors of the checkpoint's other parts were not read: {key_list(unbuilt, 4)}",
                      stacklevel=3)
    if new_head:
        warnings.warn(f"{checkpoint.folder}: these {type(model).__name__} weights are not in the checkpoint and were "
                      f"newly initialised (train them before use): {key_list(new_head)}", stacklevel=3)

    def materialise(module: nn.Module, name: str, value: torch.Tensor) -> None:
        if name in module._parameters:
            grad = module._parameters[name].requires_grad and value.is_floating_point()
            module._parameters[name] = nn.Parameter(value, requires_grad=grad)
        else:
            module._buffers[name] = value

    sizes = {k: checkpoint.shape(ck).numel() * checkpoint.dtype(ck).itemsize for k, ck in mapping.items()}
    with _progress_bar(sum(sizes.values()), checkpoint.folder) as bar:
        for path, module in list(model.named_modules()):  # parents first: a new head is set up before its children
            if path in quantized:
                layer = _load_quantized(module, path, mapping, checkpoint, qconfig, prequantized, dtype, device)
                parent, _, name = path.rpartition(".")
                setattr(model.get_submodule(parent), name, layer)
                if device.type == "cpu" and _malloc_trim():
                    _malloc_trim()(0)
                bar.update(sum(size for k, size in sizes.items() if k.startswith(path + ".")))
                continue
            prefix = path + "." if path else ""
            own = {n: t for n, t in [*module._parameters.items(), *module._buffers.items()]
                   if t is not None and prefix + n in state}
            if any(prefix + n in new_head for n in own):
                for n, t in own.items():
                    materialise(module, n, torch.empty(t.shape, device=device,
                                                       dtype=dtype if t.is_floating_point() else t.dtype))
                with torch.no_grad():
                    model.init_weights(module)
            for n in own:
                if prefix + n in mapping:  # tied copies too: tie_weights() decides (T5 keeps a differing lm_head)
                    materialise(module, n, _read_as(_lazy_for(checkpoint, mapping[prefix + n], device), device, dtype))
                    bar.update(sizes[prefix + n])
    model.tie_weights()


def _progress_bar(total_bytes: int, folder: Path):
    """tqdm over the checkpoint bytes loaded (a 7B quantized load takes minutes on a CPU): shown on terminals
    and notebooks only, by the first rank under torchrun; TQDM_DISABLE=1 silences it."""
    from tqdm.auto import tqdm

    first_rank = os.environ.get("RANK", "0") == "0"
    return tqdm(total=total_bytes, desc=f"load {folder.name}", unit="B", unit_scale=True, dynamic_ncols=True,
                disable=None if first_rank else True)


READ_CHUNK_BYTES = 1 << 22  # CPU: a few rows at a time, so no stored copy of a large tensor exists
DEVICE_READ_CHUNK_BYTES = 1 << 28  # to a GPU: a few large pieces (most tensors in one), copied asynchronously


def _read_as(tensor: LazyTensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A checkpoint tensor on `device`, floating-point ones in `dtype`. Converted or moved a few rows at a time,
    so a stored copy of a large tensor (e.g. the fp32 embeddings of a model loaded in bf16) never exists in
    host memory. To CUDA the pieces are large and read into pinned memory (see `_lazy_for`), so they copy
    asynchronously (the next read overlaps the copy) and convert on the GPU."""
    dtype = dtype if tensor.dtype.is_floating_point else tensor.dtype
    if dtype == tensor.dtype and device.type == "cpu":
        return tensor.mapped()
    if not tensor.shape or not tensor.shape[0]:
        return tensor[:].to(device, dtype)
    out = torch.empty(tensor.shape, dtype=dtype, device=device)
    chunk = READ_CHUNK_BYTES if device.type == "cpu" else DEVICE_READ_CHUNK_BYTES
    rows = max(1, chunk // (tensor.shape.numel() // tensor.shape[0] * tensor.dtype.itemsize or 1))
    for start in range(0, tensor.shape[0], rows):
        out[start:start + rows].copy_(tensor[start:start + rows], non_blocking=tensor.pin_memory)
    return out


def _lazy_for(checkpoint: Checkpoint, key: str, device: torch.device) -> LazyTensor:
    """`checkpoint.lazy(key)`, read into pinned host memory when bound for CUDA."""
    lazy = checkpoint.lazy(key)
    lazy.pin_memory = device.type == "cuda"
    return lazy


def _quantized_paths(model: nn.Module, qconfig, prequantized: bool, mapping: dict[str, str],
                     linears: set[str]) -> set[str]:
    """Linear layers to load quantized: the checkpoint's packed ones, else those `quantize` selects."""
    if qconfig is None:
        return set()
    if not prequantized:
        modules = dict(model.named_modules())
        # A layer the checkpoint lacks (a pooler initialised afresh) stays dense: there is nothing to quantize.
        return {p for p in linears if p + ".weight" in mapping and quant.should_quantize(p, modules[p], qconfig, model)}
    return {p for p in linears  # judged by the layer's tensor names in the checkpoint
            if quant_format.is_quantized_in_checkpoint(k[len(p) + 1:] for k in mapping if k.startswith(p + "."))}


def _check_keys(model: nn.Module, checkpoint: Checkpoint, state: dict, mapping: dict[str, str],
                missing: list[str], unexpected: list[str], packed: tuple[str, ...]) -> None:
    """One error listing every missing, unexpected and wrongly shaped tensor (before anything is read)."""
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {key_list(missing)}")
    if unexpected:
        problems.append(f"unexpected in the checkpoint (no such {type(model).__name__} tensor): {key_list(unexpected)}")
    shapes = [(k, tuple(checkpoint.shape(ck)), tuple(state[k].shape)) for k, ck in mapping.items()
              if k in state and not k.startswith(packed) and checkpoint.shape(ck) != state[k].shape]
    if shapes:
        problems.append("wrong shape: " + "; ".join(f"{k} is {c} in the checkpoint, {m} in the model"
                                                    for k, c, m in shapes))
        head = tuple(model.new_head_prefixes)
        if head and any(k.startswith(head) for k, _, _ in shapes):
            problems.append("the checkpoint's task head has another size: a different num_labels? Pass the "
                            "checkpoint's num_labels, or start from a checkpoint without this head")
    if problems:
        raise CheckpointError(f"{checkpoint.folder} does not fit {type(model).__name__}: " + ". ".join(problems))


def _load_quantized(module: nn.Linear, path: str, mapping: dict[str, str], checkpoint: Checkpoint, qconfig,
                    prequantized: bool, dtype: torch.dtype, device: torch.device) -> nn.Module:
    prefix = path + "."
    if prequantized:  # packed weights + quantization state exactly as save_pretrained wrote them
        tensors = {k[len(prefix):]: checkpoint.read(ck) for k, ck in mapping.items() if k.startswith(prefix)}
        return quant.load_prequantized_linear(tensors, module.in_features, module.out_features, qconfig,
                                                     device, prefix=prefix)
    # Read and quantized a few rows at a time: the full-precision matrix never exists.
    weight = _lazy_for(checkpoint, mapping[prefix + "weight"], device)
    bias = checkpoint.read(mapping[prefix + "bias"]) if module.bias is not None else None
    return quant.quantize_linear(weight, bias, qconfig, device, dtype)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, which gives the heap's free pages back to the OS, or None. Quantizing frees many
    temporaries between the packed weights it keeps; without a trim that fragmented free memory stays in RSS."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
