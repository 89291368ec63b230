"""Training: the loop, EMA, torch.distributed helpers (and, re-exported, nrdm.checkpoint)."""
from nrdm.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from nrdm.training.trainer import TrainingStopped, train

__all__ = ["CheckpointError", "TrainingStopped", "latest_checkpoint", "list_checkpoints", "load_checkpoint",
           "save_checkpoint", "train"]
