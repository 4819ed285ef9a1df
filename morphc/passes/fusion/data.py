"""What `fuse-models` needs besides the program: calibration inputs and held-out evaluation data.

Distillation needs only unlabelled inputs (the original task models are the teachers); the accuracy
bound is checked on held-out inputs, against labels where a task has them and against the original
model's own outputs where it does not (agreement, or a metric the caller chooses, e.g. cosine
similarity for an embedding task). Metrics are top-level functions so they pickle to executor workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from morphc.errors import MorphcError

Metric = Callable[[torch.Tensor, torch.Tensor], float]


class FusionDataError(MorphcError, ValueError):
    """Calibration or evaluation data that does not fit the Program (shapes, tasks, labels)."""


def accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy: argmax over the last dimension == label.

    `labels` are class indices, or (when a task has no labels) the original model's outputs of the
    same shape, whose argmax then is the label: agreement with the original.
    """
    pred = outputs.argmax(dim=-1)
    if labels.shape == outputs.shape and labels.is_floating_point():
        labels = labels.argmax(dim=-1)
    if pred.shape != labels.shape:
        raise FusionDataError(f"accuracy needs one label per output row: outputs {tuple(outputs.shape)} give "
                              f"predictions {tuple(pred.shape)}, labels have shape {tuple(labels.shape)}")
    return float((pred == labels.to(pred.dtype)).float().mean()) if pred.numel() else 0.0


def cosine_similarity(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine similarity of rows (clipped to [0, 1]): for embedding tasks compared with the original."""
    if outputs.shape != reference.shape:
        raise FusionDataError(f"cosine_similarity compares tensors of one shape, got {tuple(outputs.shape)} "
                              f"and {tuple(reference.shape)}")
    a = outputs.reshape(outputs.shape[0], -1).double()
    b = reference.reshape(reference.shape[0], -1).double()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).clamp(0.0, 1.0).mean())


@dataclass(frozen=True)
class TaskEval:
    """How one task is scored on the held-out inputs."""

    labels: torch.Tensor | None  # in eval_inputs order; None = compare with the original model's outputs
    metric: Metric = accuracy


@dataclass
class FusionData:
    """Calibration batches (unlabelled, for distillation) and held-out batches with per-task scoring."""

    calibration: list[tuple[torch.Tensor, ...]]
    eval_inputs: list[tuple[torch.Tensor, ...]]
    tasks: dict[str, TaskEval]

    def check(self, inputs: Sequence[tuple[tuple[int, ...], torch.dtype]], tasks: Sequence[str]) -> None:
        """Raise FusionDataError naming the batch and tensor when data does not fit the program.

        `inputs` are the program's (shape, dtype) per input; batch sizes may differ from the
        program's, the other dimensions and dtypes may not. Every task needs a TaskEval.
        """
        if not self.calibration:
            raise FusionDataError("FusionData.calibration is empty: distillation needs at least one batch of inputs")
        if not self.eval_inputs:
            raise FusionDataError("FusionData.eval_inputs is empty: the accuracy bound is checked on held-out inputs")
        for where, batches in (("calibration", self.calibration), ("eval_inputs", self.eval_inputs)):
            for b, batch in enumerate(batches):
                batch = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
                if len(batch) != len(inputs):
                    raise FusionDataError(f"{where}[{b}] has {len(batch)} tensor(s); the program takes {len(inputs)}")
                for i, (t, (shape, dtype)) in enumerate(zip(batch, inputs)):
                    if not isinstance(t, torch.Tensor):
                        raise FusionDataError(f"{where}[{b}][{i}] is a {type(t).__name__}, not a tensor")
                    if tuple(t.shape[1:]) != tuple(shape[1:]) or t.dtype != dtype:
                        want = f"[N, {', '.join(map(str, shape[1:]))}] {dtype}"
                        raise FusionDataError(f"{where}[{b}][{i}] has shape {list(t.shape)} {t.dtype}; the program's "
                                              f"input #{i} expects {want} (any batch size N)")
        missing = [t for t in tasks if t not in self.tasks]
        unknown = [t for t in self.tasks if t not in tasks]
        if missing or unknown:
            raise FusionDataError(f"FusionData.tasks must name exactly the program's tasks {list(tasks)}; "
                                  f"missing {missing}, unknown {unknown}")
        n_eval = sum(int(batch[0].shape[0]) for batch in self.batches("eval"))
        for name, ev in self.tasks.items():
            if ev.labels is not None and int(ev.labels.shape[0]) != n_eval:
                raise FusionDataError(f"task '{name}' has {int(ev.labels.shape[0])} labels but eval_inputs hold "
                                      f"{n_eval} examples (labels are in eval_inputs order)")

    def batches(self, which: str) -> list[tuple[torch.Tensor, ...]]:
        """Calibration ("calibration") or held-out ("eval") batches, each as a tuple of tensors."""
        source = self.calibration if which == "calibration" else self.eval_inputs
        return [(b,) if isinstance(b, torch.Tensor) else tuple(b) for b in source]


def batched(tensors: Sequence[torch.Tensor], batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """Split aligned tensors (same first dimension) into a list of batches for FusionData."""
    n = int(tensors[0].shape[0])
    return [tuple(t[i:i + batch_size] for t in tensors) for i in range(0, n, batch_size)]
