"""Reading and writing weights: safetensors files, the hub, from_pretrained / save_pretrained."""
