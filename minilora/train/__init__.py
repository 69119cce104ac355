"""The training loop, its config, optimizers and schedules, and resumable training checkpoints."""
from minilora.train.config import TrainConfig
from minilora.train.loop import evaluate, seed_everything, train
from minilora.train.optim import build_optimizer, lr_factor

__all__ = ["TrainConfig", "train", "evaluate", "seed_everything", "build_optimizer", "lr_factor"]
