"""Acting on scores: per-task weights, pruning policy, and the sampler that applies them."""

from lightning_metaif.actions.pruning import PruningPolicy
from lightning_metaif.actions.sampler import TaskSampler
from lightning_metaif.actions.state import TaskState
from lightning_metaif.actions.weighting import TaskWeighting

__all__ = ["PruningPolicy", "TaskSampler", "TaskState", "TaskWeighting"]
