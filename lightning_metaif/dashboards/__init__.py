"""Records, metrics, CSV files and W&B dashboards of influence scoring rounds.

``wandb`` is optional: ``WandbDashboard`` imports it lazily (``pip install "lightning-metaif[wandb]"``).
"""

from lightning_metaif.dashboards.files import RoundFileWriter, RunFiles, load_run, scores_csv_text
from lightning_metaif.dashboards.metrics import round_metrics, top_k_count
from lightning_metaif.dashboards.wandb_dashboard import WandbDashboard, image_to_array, require_wandb
from lightning_metaif.records import Decision, SampleScore, ScoreRound, harmful_order

__all__ = [
    "Decision",
    "RoundFileWriter",
    "RunFiles",
    "SampleScore",
    "ScoreRound",
    "WandbDashboard",
    "harmful_order",
    "image_to_array",
    "load_run",
    "require_wandb",
    "round_metrics",
    "scores_csv_text",
    "top_k_count",
]
