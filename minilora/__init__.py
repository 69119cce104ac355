"""minilora: small, hackable LoRA / QLoRA fine-tuning in plain PyTorch."""
from .adapter import adapter_state_dict, load_adapter, save_adapter
from .checkpointing import enable_gradient_checkpointing
from .config import LoraConfig
from .inject import apply_lora, merge_and_unload, merge_lora, trainable_parameters, unmerge_lora
from .lora import LoraLinear

__version__ = "0.1.0"
