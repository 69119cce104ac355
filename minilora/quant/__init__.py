"""Quantized frozen base layers (NF4 / int8 on bitsandbytes), their config and their on-disk format."""
