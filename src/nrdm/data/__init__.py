"""Datasets (no torchvision) and deterministic, resumable batching."""
from nrdm.data.datasets import (DATASETS, ImageFolder, TensorImages, build_dataset, data_shape,
                                load_digits_dataset, load_idx_dataset, read_idx)
from nrdm.data.loader import BatchStream, global_batch_indices

__all__ = ["DATASETS", "ImageFolder", "TensorImages", "build_dataset", "data_shape", "load_digits_dataset",
           "load_idx_dataset", "read_idx", "BatchStream", "global_batch_indices"]
