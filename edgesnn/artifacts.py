"""The artifacts that flow between stages: one frozen dataclass each.

    checkpoint ──load──▶ LoadedModel ──capture──▶ Teacher ──synth──▶ SyntheticSet
        ──convert──▶ SpikingModel ──eval──▶ EvalReport

Stages are functions from artifacts to an artifact; only ``pipeline.py`` reads
and writes them on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from .graph import Graph

Normalize = tuple[tuple[float, ...], tuple[float, ...]]

# A progress callback: (task description, steps done, steps total). Library code
# reports through it and never prints; the CLI renders it as a progress bar.
Progress = Callable[[str, int, int], None]


def no_progress(task: str, done: int, total: int) -> None:
    """The default progress callback: report nothing."""


@dataclass(frozen=True)
class LoadedModel:
    """A user's ANN as loaded from a zoo name, checkpoint or archive."""

    module: nn.Module  # the classifier in eval mode; forward(x: N×C×H×W) -> N×classes logits
    input_shape: tuple[int, int, int] | None  # C, H, W of one input, None when it could not be inferred
    num_classes: int | None  # number of logits, None when it could not be inferred
    normalize: Normalize | None  # per-channel (mean, std) the model expects on [0,1] pixels, if known
    source: str  # what was loaded, for reports: "zoo:fmnist_resnet8", "model.pt (state_dict, arch=...)"
    format: str  # "zoo", "state_dict", "lightning", "export", "torchscript" or "pickle"


@dataclass(frozen=True)
class Teacher:
    """The ANN captured as a checked graph of supported ops, ready for synthesis and conversion."""

    graph: Graph  # the captured network, BatchNorm not yet folded
    input_shape: tuple[int, int, int]  # C, H, W of one input image
    num_classes: int  # number of output logits
    normalize: Normalize | None  # per-channel (mean, std) on [0,1] pixels, if known
    source: str  # where the ANN came from (LoadedModel.source)

    @property
    def network(self) -> nn.Module:
        """The ANN as an eval-mode ``nn.Module`` built from the graph.

        Its BatchNorm layers are real ``nn.BatchNorm1d/2d`` modules holding the
        running statistics, so forward hooks can observe their inputs
        (DeepInversion needs exactly that).
        """
        from .graph import GraphNetwork

        return GraphNetwork(self.graph).eval()


@dataclass(frozen=True)
class SyntheticSet:
    """Data-free images synthesised from the teacher alone."""

    images: torch.Tensor  # float32 N×C×H×W in the teacher's normalised input space
    labels: torch.Tensor  # int64 N, the class each image was synthesised for
    teacher_logits: torch.Tensor  # float32 N×classes, the teacher's logits on the final images
    method: str  # "deepinversion" (teacher has BatchNorm) or "data_impression"
    metrics: dict[str, float]  # target_agreement, bn_error, diversity, images_per_second, seconds, ...
    config: dict[str, Any] = field(default_factory=dict)  # the SynthConfig used, as plain values


@dataclass(frozen=True)
class SpikingModel:
    """An SNN converted from the teacher: integrate-and-fire neurons in place of ReLUs."""

    graph: Graph  # the network with BatchNorm folded into the preceding conv/linear
    thresholds: dict[str, torch.Tensor]  # firing threshold θ per neuron node: shape () per layer or (C,) per channel
    initial_membrane: float  # v(0) as a fraction of θ (0.5: start half-way to the threshold)
    timesteps: int  # default number of timesteps T for inference
    input_shape: tuple[int, int, int]  # C, H, W of one input image
    num_classes: int  # number of output logits
    normalize: Normalize | None  # per-channel (mean, std) on [0,1] pixels, inherited from the teacher
    config: dict[str, Any] = field(default_factory=dict)  # the ConvertConfig used, as plain values
    metrics: dict[str, Any] = field(default_factory=dict)  # calibration figures (images used, seconds, ...)
    # Spike amplitude per neuron node, a scalar tensor, where it differs from θ: a spike then
    # carries a·s instead of θ·s. binarize sets one per layer, so that a binary layer's input
    # is one scale times a binary map and the layer can run as popcounts. Empty: amplitude = θ.
    amplitudes: dict[str, torch.Tensor] = field(default_factory=dict)

    def amplitude(self, name: str) -> torch.Tensor:
        """The amplitude of neuron ``name``'s spikes: its own entry, else its threshold θ."""
        return self.amplitudes.get(name, self.thresholds[name])


@dataclass(frozen=True)
class EvalReport:
    """Accuracy of the ANN and of the SNN at several timesteps on a labelled set."""

    ann_accuracy: float  # fraction of images the ANN classifies correctly
    snn_accuracy: dict[int, float]  # T -> fraction correct for the SNN after T timesteps
    agreement: dict[int, float]  # T -> fraction of images where SNN and ANN predict the same class
    images: int  # number of images evaluated
    source: str  # the data set, for reports
    seconds: float  # wall time of the evaluation
