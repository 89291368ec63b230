"""Datasets (no torchvision), their registry, and deterministic, resumable batching."""
from nrdm.data.datasets import ImageFolder, TensorImages, load_digits_dataset, load_idx_dataset, read_idx
from nrdm.data.loader import BatchStream, global_batch_indices
from nrdm.data.registry import (DATASETS, DatasetSpec, build_dataset, data_shape, dataset_spec, materialise,
                                pixel_config, register)

__all__ = ["DATASETS", "DatasetSpec", "ImageFolder", "TensorImages", "build_dataset", "data_shape", "dataset_spec",
           "load_digits_dataset", "load_idx_dataset", "materialise", "pixel_config", "read_idx", "register",
           "BatchStream", "global_batch_indices"]
