"""The model zoo: pretrained teachers shipped with edgesnn.

Each entry names an architecture factory, the input it expects and the file of
its trained weights (a plain state_dict, loadable with ``weights_only=True``).
``scripts/train_zoo.py`` trains them from the Fashion-MNIST training set and
records the measured test accuracy in ``zoo.json`` beside the weights.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from .models import LeNetJudge, ResNetSmall, VGGSmall

ZOO_DIR = Path(__file__).parent
FASHION_MNIST_NORMALIZE = ((0.2860,), (0.3530,))


@dataclass(frozen=True)
class ZooEntry:
    """One pretrained teacher of the zoo."""

    name: str  # registry key, used on the command line
    factory: Callable[[], nn.Module]  # builds the untrained architecture
    description: str  # one line for `edgesnn zoo`
    input_shape: tuple[int, int, int]  # C, H, W of one input image
    num_classes: int  # number of output logits
    normalize: tuple[tuple[float, ...], tuple[float, ...]]  # per-channel mean, std applied to [0,1] pixels

    @property
    def weights_path(self) -> Path:
        return ZOO_DIR / f"{self.name}.pt"

    @property
    def metadata(self) -> dict:
        """Training record (accuracy, epochs, seed, sha256) from zoo.json, or {} if untrained."""
        return _read_metadata().get(self.name, {})


def _read_metadata() -> dict:
    path = ZOO_DIR / "zoo.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _robust(base: ZooEntry, note: str, suffix: str = "_robust") -> ZooEntry:
    """The zoo entry of ``base`` fine-tuned adversarially (scripts/train_zoo.py ROBUST): same architecture, its own weights."""
    return dataclasses.replace(base, name=f"{base.name}{suffix}", description=f"{base.name} fine-tuned adversarially (L2): {note}")


def _fmnist_vgg_4conv(name: str, widths: tuple[int, int, int], size: str, note: str) -> ZooEntry:
    """A 4-conv VGGSmall for Fashion-MNIST (convs 1, 2, 1 per stage): the wide family for one-timestep use."""
    channels = f"{widths[0]}/{widths[1]}/{widths[2]}"
    return ZooEntry(
        name,
        lambda: VGGSmall(num_classes=10, in_channels=1, widths=widths, convs=(1, 2, 1)),
        f"{size} VGG-style CNN (4 conv, {channels} channels, BatchNorm, average pooling){note}",
        (1, 28, 28),
        10,
        FASHION_MNIST_NORMALIZE,
    )


_VGG_WIDE = _fmnist_vgg_4conv("fmnist_vgg_wide", (48, 96, 192), "Wide", " for Fashion-MNIST")
_VGG_WIDER = _fmnist_vgg_4conv("fmnist_vgg_wider", (64, 128, 256), "Wider", ": more one-bit channels at T=1")
_VGG_WIDEST = _fmnist_vgg_4conv("fmnist_vgg_widest", (80, 160, 320), "Widest", ": more one-bit channels still")

ZOO: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        ZooEntry(
            "fmnist_resnet8",
            lambda: ResNetSmall(num_classes=10, in_channels=1, widths=(16, 32, 64), blocks=(1, 1, 1)),
            "ResNet-8 (16/32/64 channels, 1x1-conv shortcuts, BatchNorm) for Fashion-MNIST",
            (1, 28, 28),
            10,
            FASHION_MNIST_NORMALIZE,
        ),
        ZooEntry(
            "fmnist_vgg",
            lambda: VGGSmall(num_classes=10, in_channels=1, widths=(24, 48, 96)),
            "VGG-style CNN (5 conv, 24/48/96 channels, BatchNorm, average pooling) for Fashion-MNIST",
            (1, 28, 28),
            10,
            FASHION_MNIST_NORMALIZE,
        ),
        _VGG_WIDE,
        _robust(_VGG_WIDE, "its data-free images look more like clothes, its SNN is closer to it"),
        _VGG_WIDER,
        _robust(_VGG_WIDER, "its one-timestep SNN gains 1-2 points over the wide one"),
        _VGG_WIDEST,
        _robust(_VGG_WIDEST, "2 epochs"),
        _robust(_VGG_WIDEST, "6 epochs, 3x longer; the best teacher for build --private --binary", suffix="_robust_long"),
    )
}

DEFAULT_ZOO_MODEL = "fmnist_resnet8"

# Judges of the privacy audit: classifiers trained separately on the same real data
# as the teachers, with another architecture. Not teachers, so not in ZOO.
JUDGES: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        ZooEntry(
            "fmnist_judge",
            lambda: LeNetJudge(num_classes=10, in_channels=1),
            "LeNet-style judge (5x5 convs, max pooling, tanh, no BatchNorm) for Fashion-MNIST audits",
            (1, 28, 28),
            10,
            FASHION_MNIST_NORMALIZE,
        ),
    )
}


def judge_for(teacher_name: str) -> ZooEntry | None:
    """The audit judge of a zoo teacher (same data set), or None."""
    return JUDGES["fmnist_judge"] if teacher_name.startswith("fmnist_") else None
