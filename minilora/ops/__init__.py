"""Hand-written kernels with their own backward passes, each tested against the plain math it replaces.

They import nothing from minilora's LoRA, model or quantization code: models call them, not the reverse.
"""
