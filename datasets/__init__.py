"""Data sets for the bayes-kfoc experiments: in-distribution splits, shifts and OOD sets.

Everything is either bundled with scikit-learn or read from files in a directory the user
names; nothing is ever downloaded and nothing is unpickled.

Example:
    >>> from datasets import load_dataset, load_ood
    >>> splits = load_dataset("digits04", seed=0)
    >>> ood = load_ood("digits59", splits, seed=0)
"""

from datasets.cifar import load_cifar10, read_cifar_batch
from datasets.digits import load_digits
from datasets.errors import DatasetFileError
from datasets.idx import load_idx_dataset, read_idx
from datasets.images import match_image_shape
from datasets.ood import gaussian_noise, held_out_digits, natural_patches, uniform_noise
from datasets.raw import RawImageData, raw_to_splits
from datasets.registry import available_datasets, available_ood, load_dataset, load_ood
from datasets.shift import rotate, rotation_angles
from datasets.splits import Splits, stratified_split, train_val_split
from datasets.svhn import load_svhn, read_svhn_mat
from datasets.tabular import load_tabular

__all__ = [
    "DatasetFileError",
    "RawImageData",
    "Splits",
    "available_datasets",
    "available_ood",
    "gaussian_noise",
    "held_out_digits",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_idx_dataset",
    "load_ood",
    "load_svhn",
    "load_tabular",
    "match_image_shape",
    "natural_patches",
    "raw_to_splits",
    "read_cifar_batch",
    "read_idx",
    "read_svhn_mat",
    "rotate",
    "rotation_angles",
    "stratified_split",
    "train_val_split",
    "uniform_noise",
]
