"""Hand-written kernels with their own backward passes, each tested against a plain reference."""
