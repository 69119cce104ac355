"""minilora: small, hackable LoRA / QLoRA fine-tuning in plain PyTorch.

The LoRA core, the training loop and generation are imported eagerly; what pulls heavier modules
(bitsandbytes, the model files, the loader, the tokenizer) is imported on first use, so `import minilora`
stays fast and never imports transformers or peft.
"""
from importlib import import_module

from minilora.lora.adapter import adapter_state_dict, load_adapter, save_adapter
from minilora.models.gradient_checkpointing import enable_gradient_checkpointing
from minilora.lora.config import LoraConfig
# train and generate are functions named like their modules: import them eagerly so the function, not the
# submodule, is what `minilora.train` / `minilora.generate` mean.
from minilora.generate import generate
from minilora.lora.inject import apply_lora, merge_and_unload, merge_lora, trainable_parameters, unmerge_lora
from minilora.lora.layer import LoraLinear
from minilora.train.plot import plot_metrics
from minilora.train.loop import evaluate, train
from minilora.train.config import TrainConfig

__version__ = "0.1.0"

_LAZY = {
    "from_pretrained": "io.load", "save_pretrained": "io.save",
    "load_tokenizer": "text.tokenizer", "Tokenizer": "text.tokenizer",
    "QuantConfig": "quant.config",
    "resolve_device": "device",
    "data": None, "metrics": None, "models": None,
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'minilora' has no attribute {name!r}")
    module = import_module(f".{_LAZY[name] or name}", __name__)
    value = module if _LAZY[name] is None else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "LoraConfig", "LoraLinear", "apply_lora", "trainable_parameters", "save_adapter", "load_adapter",
    "adapter_state_dict", "merge_lora", "unmerge_lora", "merge_and_unload", "enable_gradient_checkpointing",
    "generate", "train", "TrainConfig", "evaluate", "plot_metrics",
    *_LAZY,
]
