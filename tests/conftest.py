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
    # No output-bias calibration: the tests that start from this model (binarize, torchrun training) measure
    # their own stage from the trained network as it is; test_privatize checks the calibration.
    config = PrivatizeConfig(timesteps=1, schedule=(), final_steps=30, bias_noise=0.0, train=TrainConfig(batch_size=64))
    return privatize(converted, resnet_teacher, resnet_synthetic, config)


@pytest.fixture(scope="session")
def binarized(one_step, resnet_teacher, resnet_synthetic):
    """``one_step`` binarized with a 100-point budget: every middle layer binary, first and last int8."""
    from edgesnn.binarize import BinarizeConfig, binarize
    from edgesnn.privatize import TrainConfig

    config = BinarizeConfig(max_loss=100.0, step_steps=3, final_steps=5, holdout=0.2, train=TrainConfig(batch_size=64, lr=5e-4))
    return binarize(one_step, resnet_teacher, resnet_synthetic, config)


@pytest.fixture(scope="session")
def mixed(binarized, one_step, resnet_teacher, resnet_synthetic):
    """``one_step`` binarized as ``binarized`` with 6,000 bytes more to spend (a size ratio): the spare bytes
    make some output channels of the last binarized layer int8 again, a "mixed" layer."""
    from edgesnn.binarize import BinarizeConfig, binarize, model_bytes, teacher_bytes_fp32
    from edgesnn.privatize import TrainConfig

    ratio = teacher_bytes_fp32(resnet_teacher) / (model_bytes(binarized) + 6000)
    config = BinarizeConfig(max_loss=100.0, step_steps=3, final_steps=5, holdout=0.2, size_ratio=ratio, train=TrainConfig(batch_size=64, lr=5e-4))
    return binarize(one_step, resnet_teacher, resnet_synthetic, config)


def _as_synthetic(images: torch.Tensor, labels: torch.Tensor):
    from edgesnn.artifacts import SyntheticSet

    return SyntheticSet(images, labels, torch.zeros(len(labels), 10), "test", {})


@pytest.fixture(scope="session")
def pixels(real_images) -> torch.Tensor:
    """The 500 real test images as the uint8 pixels a device would read."""
    from edgesnn.export.program import pixels_from_images

    return pixels_from_images(torch.from_numpy(real_images.images), FASHION_MNIST_NORMALIZE)


@pytest.fixture(scope="session")
def vgg_one_step(real_images):
    """The zoo VGG converted for T=1 (float weights: the export quantizes them to int8)."""
    from edgesnn.convert import ConvertConfig, convert
    from edgesnn.pipeline import load_teacher

    teacher = load_teacher("fmnist_vgg")
    images = torch.from_numpy(real_images.images[:128])
    return convert(teacher, _as_synthetic(images, torch.from_numpy(real_images.labels[:128])), ConvertConfig(timesteps=1, bias_correction=False))


@pytest.fixture(scope="session")
def lambda_resnet_one_step(real_images):
    """A user's ResNet whose shortcut slices and zero-pads channels inside a lambda module (random weights), T=1."""
    import importlib.util
    from pathlib import Path

    from torch import nn

    from edgesnn.artifacts import LoadedModel
    from edgesnn.capture import capture
    from edgesnn.convert import ConvertConfig, convert

    spec = importlib.util.spec_from_file_location("resnet_lambda_export", Path(__file__).parent / "fixtures" / "resnet_lambda.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.resnet8(in_channels=1)
    generator = torch.Generator().manual_seed(0)
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.copy_(torch.rand(layer.num_features, generator=generator) - 0.5)
            layer.running_var.copy_(torch.rand(layer.num_features, generator=generator) + 0.5)
    teacher = capture(LoadedModel(model.eval(), (1, 28, 28), 10, FASHION_MNIST_NORMALIZE, "resnet_lambda:resnet8", "state_dict"))
    images = torch.from_numpy(real_images.images[:128])
    return convert(teacher, _as_synthetic(images, torch.from_numpy(real_images.labels[:128])), ConvertConfig(timesteps=1, bias_correction=False))



@pytest.fixture(scope="session")
def signed_bundle(tmp_path_factory):
    """A real, small, signed bundle: the zoo ResNet converted for T=1 from 16 synthetic images and
    exported to every target (~7 s). Fields: folder, key (private), public, config (without the seal).
    Copy the folder before changing it."""
    from types import SimpleNamespace

    from edgesnn.bundle import SealConfig, keygen
    from edgesnn.convert import ConvertConfig
    from edgesnn.pipeline import BuildConfig, build
    from edgesnn.synth import SynthConfig

    root = tmp_path_factory.mktemp("signed_bundle")
    key = root / "signer"
    keygen(key)
    config = BuildConfig(
        model="fmnist_resnet8",
        synth=SynthConfig(count=16, iterations=2, min_iterations=0, batch_size=16),
        convert=ConvertConfig(timesteps=1, bias_correction=False),
        targets="all",
        profile=False,  # the profile stage is tested on its own; it would triple this build's time
    )
    import dataclasses

    build(dataclasses.replace(config, seal=SealConfig(sign_key=key)), root / "bundle")
    return SimpleNamespace(folder=root / "bundle", key=key, public=root / "signer.pub", config=config)
