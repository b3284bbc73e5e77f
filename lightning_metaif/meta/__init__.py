"""Meta-learning building blocks: task pools with stable ids, splits, noise, the MAML module, ``higher``."""

from lightning_metaif.meta.datasets import (
    MetaSplits,
    class_split,
    digits_splits,
    gaussian_mixture_splits,
    mini_imagenet_splits,
    omniglot_splits,
    sinusoid_splits,
)
from lightning_metaif.meta.noise import CorruptedTaskPool, Corruption, corrupt_tasks
from lightning_metaif.meta.pools import ClassificationTaskPool, SinusoidTaskPool, TaskPool, collate_tasks

__all__ = [
    "ClassificationTaskPool",
    "CorruptedTaskPool",
    "Corruption",
    "MetaSplits",
    "SinusoidTaskPool",
    "TaskPool",
    "class_split",
    "collate_tasks",
    "corrupt_tasks",
    "digits_splits",
    "gaussian_mixture_splits",
    "mini_imagenet_splits",
    "omniglot_splits",
    "sinusoid_splits",
]
