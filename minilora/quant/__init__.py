"""Quantized frozen base layers (NF4 / int8 on bitsandbytes), their config and their on-disk format.

Importing this package does not import bitsandbytes: the layers import it on first use (`bnb.py`).
"""
from minilora.quant.bnb import bnb_version, check_blocksize, import_bitsandbytes
from minilora.quant.config import QuantConfig, resolve_quant_config, should_quantize
from minilora.quant.layers import (DECODE_MAX_ROWS, Int8Linear, NF4Linear, QuantizedLinear, decodes_with_matmul_4bit,
                                   is_quantized, load_prequantized_linear, quantize_linear)

__all__ = ["QuantConfig", "resolve_quant_config", "should_quantize", "QuantizedLinear", "NF4Linear", "Int8Linear",
           "is_quantized", "quantize_linear", "load_prequantized_linear", "decodes_with_matmul_4bit",
           "DECODE_MAX_ROWS", "import_bitsandbytes", "bnb_version", "check_blocksize"]
