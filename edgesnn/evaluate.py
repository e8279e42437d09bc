"""Stage ``eval``: accuracy of the ANN and of the SNN at several timesteps on real images.

The simulation is causal, so the SNN's output after t steps does not depend on
what comes later: one run to the largest T gives the accuracy at every smaller
T from the running averages of the output layer.
"""

from __future__ import annotations

import time

import torch

from .artifacts import EvalReport, Progress, SpikingModel, Teacher, no_progress
from .convert import SpikingNetwork
from .datasets import LabelledImages
from .errors import DataError
from .graph import GraphNetwork

SAMPLES_PER_CALL = 4096  # T·B samples per simulation call: bounds memory at large T


def check_images(data: LabelledImages, input_shape: tuple[int, int, int], num_classes: int) -> None:
    found = tuple(data.images.shape[1:])
    if found != tuple(input_shape):
        raise DataError(f"{data.source}: images have shape {found} but the model expects {tuple(input_shape)} (C,H,W)")
    if int(data.labels.max()) >= num_classes:
        raise DataError(f"{data.source}: label {int(data.labels.max())} is out of range for a model with {num_classes} classes")


def ann_predictions(teacher_graph_network: torch.nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([teacher_graph_network(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])


def snn_predictions(model: SpikingModel, images: torch.Tensor, timesteps: int, progress: Progress = no_progress) -> torch.Tensor:
    """Predicted class after each of t = 1..T steps: shape T×N."""
    network = SpikingNetwork(model)
    batch = max(1, min(1000, SAMPLES_PER_CALL // timesteps))
    predictions = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            predictions.append(network(images[start : start + batch], timesteps).argmax(2))
            progress("simulate", min(start + batch, len(images)), len(images))
    return torch.cat(predictions, dim=1)


def evaluate(teacher: Teacher, model: SpikingModel, data: LabelledImages, timesteps: list[int], progress: Progress = no_progress) -> EvalReport:
    """ANN accuracy, SNN accuracy and ANN/SNN agreement at each T in ``timesteps``."""
    if not timesteps or any(t < 1 for t in timesteps):
        raise DataError(f"timesteps {timesteps}: expected positive integers, e.g. 1,2,4,8")
    check_images(data, teacher.input_shape, teacher.num_classes)
    started = time.perf_counter()
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels)
    ann = ann_predictions(GraphNetwork(teacher.graph).eval(), images)
    snn = snn_predictions(model, images, max(timesteps), progress)
    ann_accuracy = float((ann == labels).float().mean())
    snn_accuracy = {t: float((snn[t - 1] == labels).float().mean()) for t in sorted(set(timesteps))}
    agreement = {t: float((snn[t - 1] == ann).float().mean()) for t in sorted(set(timesteps))}
    return EvalReport(ann_accuracy, snn_accuracy, agreement, len(labels), data.source, round(time.perf_counter() - started, 3))


def parse_timesteps(text: str) -> list[int]:
    """``"1,2,4,8"`` -> [1, 2, 4, 8]."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DataError(f"--timesteps {text!r}: expected comma-separated integers, e.g. 1,2,4,8") from None
    if not values or any(v < 1 or v > 4096 for v in values):
        raise DataError(f"--timesteps {text!r}: each T must be between 1 and 4096")
    return sorted(set(values))


def accuracy_table(report: EvalReport) -> list[tuple[str, float, float | None]]:
    """Rows (model, accuracy, agreement with ANN) for the CLI's table."""
    rows: list[tuple[str, float, float | None]] = [("ANN", report.ann_accuracy, None)]
    rows += [(f"SNN T={t}", acc, report.agreement[t]) for t, acc in report.snn_accuracy.items()]
    return rows


__all__ = ["evaluate", "parse_timesteps", "accuracy_table", "snn_predictions", "ann_predictions", "check_images"]
