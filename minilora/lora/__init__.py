"""LoRA: its config, the layer, putting layers into a model, and adapters in peft's format."""
