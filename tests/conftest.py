"""Shared fixtures: the real zoo teachers, real Fashion-MNIST images, a small synthetic set."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep PyTorch from oversubscribing them when tests run beside other work.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from edgesnn.datasets import PACKAGED_SUBSET, LabelledImages, load_labelled_images  # noqa: E402
from edgesnn.zoo import FASHION_MNIST_NORMALIZE  # noqa: E402


@pytest.fixture(scope="session")
def real_images() -> LabelledImages:
    """500 real Fashion-MNIST test images (shipped subset), normalised as the zoo expects."""
    return load_labelled_images(PACKAGED_SUBSET, normalize=FASHION_MNIST_NORMALIZE, limit=500)


@pytest.fixture(scope="session")
def resnet_teacher():
    from edgesnn.pipeline import load_teacher

    return load_teacher("fmnist_resnet8")


@pytest.fixture(scope="session")
def resnet_synthetic(resnet_teacher):
    """256 DeepInversion images of the zoo ResNet, with the default recipe."""
    from edgesnn.synth import SynthConfig, synthesize

    return synthesize(resnet_teacher, SynthConfig(count=256, seed=0))
