"""Model fusion (`fuse-models`): several task models become one multi-task model sharing layers.

data.py (FusionData: calibration and held-out data), distill.py (accuracy recovery of a candidate),
search.py (annealing with predictive filtering), state.py (resumable search state), report.py
(Pareto front, table, plot), fuse_models.py (the pass).
"""

from morphc.passes.fusion import fuse_models  # noqa: F401  (registration)
from morphc.passes.fusion.data import FusionData, FusionDataError, TaskEval, accuracy, batched, cosine_similarity

__all__ = ["FusionData", "FusionDataError", "TaskEval", "accuracy", "batched", "cosine_similarity"]
