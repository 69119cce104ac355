"""LoRA: its config, the layer, putting layers into a model, and adapters in peft's format."""
from minilora.lora.adapter import adapter_state_dict, load_adapter, save_adapter
from minilora.lora.config import LoraConfig
from minilora.lora.inject import apply_lora, merge_and_unload, merge_lora, trainable_parameters, unmerge_lora
from minilora.lora.layer import LoraLinear

__all__ = ["LoraConfig", "LoraLinear", "apply_lora", "merge_lora", "unmerge_lora", "merge_and_unload",
           "trainable_parameters", "save_adapter", "load_adapter", "adapter_state_dict"]
