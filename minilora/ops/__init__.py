"""Hand-written kernels with their own backward passes, each tested against the plain math it replaces.

They import nothing from minilora's LoRA, model or quantization code: models call them, not the reverse.
"""
from minilora.ops.attention import attention
from minilora.ops.cross_entropy import causal_lm_loss, cross_entropy
from minilora.ops.linear_group import linear_group
from minilora.ops.rms_norm import rms_norm
from minilora.ops.rotary import rotary

__all__ = ["attention", "causal_lm_loss", "cross_entropy", "linear_group", "rms_norm", "rotary"]
