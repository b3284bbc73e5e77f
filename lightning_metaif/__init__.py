"""lightning-metaif: task and sample influence for meta-learning, as a PyTorch Lightning callback.

Scores follow one convention everywhere: a score is the first-order predicted *increase* of the reference
loss if the task (or sample) were removed and the model retrained. Positive = helpful, negative = harmful.

Names are imported lazily, so ``import lightning_metaif`` stays cheap and the pure-torch engine
(``lightning_metaif.influence``) never imports Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0.dev0"

_EXPORTS: dict[str, str] = {
    # engine (pure torch)
    "Task": "lightning_metaif.influence.tasks",
    "TaskBatch": "lightning_metaif.influence.tasks",
    "MetaProblem": "lightning_metaif.influence.problem",
    "ParamLayout": "lightning_metaif.influence.problem",
    "per_task_gradients": "lightning_metaif.influence.gradients",
    "reference_gradient": "lightning_metaif.influence.gradients",
    "TotalHessian": "lightning_metaif.influence.hessian",
    "solve": "lightning_metaif.influence.solvers",
    "SolverError": "lightning_metaif.influence.solvers",
    "RandomProjection": "lightning_metaif.influence.projection",
    "GradientStore": "lightning_metaif.influence.store",
    "task_influence": "lightning_metaif.influence.estimators",
    "instance_influence": "lightning_metaif.influence.instance",
    "InstanceInfluenceResult": "lightning_metaif.influence.instance",
    "parameter_change": "lightning_metaif.influence.estimators",
    "tracin_scores": "lightning_metaif.influence.estimators",
    "InfluenceResult": "lightning_metaif.influence.results",
    "Checkpoint": "lightning_metaif.influence.tracin",
    "TracInAccumulator": "lightning_metaif.influence.tracin",
    # meta-learning building blocks
    "MAML": "lightning_metaif.meta.maml",
    "HigherProblem": "lightning_metaif.meta.higher_adapter",
    "ConvNet": "lightning_metaif.meta.backbones",
    "MLP": "lightning_metaif.meta.backbones",
    "MetaDataModule": "lightning_metaif.meta.datamodule",
    "TaskPool": "lightning_metaif.meta.pools",
    "ClassificationTaskPool": "lightning_metaif.meta.pools",
    "SinusoidTaskPool": "lightning_metaif.meta.pools",
    "collate_tasks": "lightning_metaif.meta.pools",
    "digits_splits": "lightning_metaif.meta.datasets",
    "sinusoid_splits": "lightning_metaif.meta.datasets",
    "omniglot_splits": "lightning_metaif.meta.datasets",
    "mini_imagenet_splits": "lightning_metaif.meta.datasets",
    "corrupt_tasks": "lightning_metaif.meta.noise",
    # the Lightning side
    "MetaInfluence": "lightning_metaif.callback",
    "GradientStoreConfig": "lightning_metaif.config",
    "Trajectory": "lightning_metaif.estimators",
    "Checkpoints": "lightning_metaif.estimators",
    "TaskIF": "lightning_metaif.estimators",
    "Ensemble": "lightning_metaif.estimators",
    "SampleInfluence": "lightning_metaif.estimators",
    "Decision": "lightning_metaif.records",
    "TaskSampler": "lightning_metaif.actions.sampler",
    "TaskState": "lightning_metaif.actions.state",
    "TaskWeighting": "lightning_metaif.actions.weighting",
    "PruningPolicy": "lightning_metaif.actions.pruning",
    "ScoreRound": "lightning_metaif.records",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_metaif' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
