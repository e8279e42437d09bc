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


@pytest.fixture(scope="session")
def one_step(resnet_teacher, resnet_synthetic):
    """The zoo ResNet converted and retrained briefly to one timestep (private, float weights)."""
    from edgesnn.convert import ConvertConfig, convert
    from edgesnn.privatize import PrivatizeConfig, TrainConfig, privatize

    converted = convert(resnet_teacher, resnet_synthetic, ConvertConfig(timesteps=2))
    config = PrivatizeConfig(timesteps=1, schedule=(), final_steps=30, train=TrainConfig(batch_size=64))
    return privatize(converted, resnet_teacher, resnet_synthetic, config)


@pytest.fixture(scope="session")
def binarized(one_step, resnet_teacher, resnet_synthetic):
    """``one_step`` binarized with a 100-point budget: every middle layer binary, first and last int8."""
    from edgesnn.binarize import BinarizeConfig, binarize
    from edgesnn.privatize import TrainConfig

    config = BinarizeConfig(max_loss=100.0, step_steps=3, final_steps=5, holdout=0.2, train=TrainConfig(batch_size=64, lr=5e-4))
    return binarize(one_step, resnet_teacher, resnet_synthetic, config)
