"""Datasets as device-resident uint8 tensors, their splits, clean subsets and batching.

`load_dataset(name)` -> `DatasetSplits` (victim-training set, defender pool, test set);
`clean_subset(splits, fraction=|shots=, seed=)` draws the defender's data from the pool;
`batches` / `sample_batches` iterate on the device with batched `Augment`.
"""
from .augment import Augment, random_crop, random_flip
from .batches import batches, repeated_batches, sample_batches
from .images import ImageSet, to_float, to_uint8
from .sources import default_cache_dir, load_image_folder
from .splits import CLEAN_RULES, DATASETS, DatasetSplits, clean_subset, clean_subset_index, load_dataset

__all__ = [
    "Augment", "CLEAN_RULES", "DATASETS", "DatasetSplits", "ImageSet", "batches", "clean_subset", "clean_subset_index", "default_cache_dir",
    "load_dataset", "load_image_folder", "random_crop", "random_flip", "repeated_batches", "sample_batches", "to_float", "to_uint8",
]
