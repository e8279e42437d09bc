"""Quality figures of a synthetic set, measured with the teacher alone.

- target agreement: fraction of images whose teacher argmax is the target label;
- BN statistics error: how far the per-channel mean and variance of the inputs of
  every BatchNorm layer, over the whole synthetic set, are from the running
  statistics the teacher learnt on its (unseen) training data (relative errors,
  averaged over layers; see :func:`relative_statistics_error`);
- diversity: mean pairwise cosine distance of the teacher's penultimate features
  (the input of its last ``nn.Linear``) within a class, averaged over classes.

All three come from one forward pass over the set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batchnorm_layers(network: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of a network that hold running statistics, in module order."""
    return [m for m in network.modules() if isinstance(m, _BATCHNORM) and m.running_mean is not None and m.running_var is not None]


def last_linear(network: nn.Module) -> nn.Linear | None:
    """The classifier layer: the last ``nn.Linear`` in module order, or None."""
    linears = [m for m in network.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def channel_moments(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel first and second moments of a BN input (N×C or N×C×...): two N×C tensors."""
    if inputs.dim() == 2:
        return inputs, inputs.square()
    spatial = tuple(range(2, inputs.dim()))  # reduce in place: a reshape would copy a channels-last tensor
    return inputs.mean(dim=spatial), inputs.square().mean(dim=spatial)


def relative_statistics_error(mean: torch.Tensor, var: torch.Tensor, layer: nn.modules.batchnorm._BatchNorm) -> float:
    """(‖μ̂−μ‖₂/‖σ‖₂ + ‖σ̂²−σ²‖₂/‖σ²‖₂) / 2 against a BN layer's running mean μ and variance σ².

    The mean error is measured in units of the running standard deviation σ
    (per-channel vector) rather than of ‖μ‖: running means are often close to
    zero (the first layer's are ~0.03 on the zoo teachers), which would make a
    harmless shift look like a 100% error.
    """
    running_mean = layer.running_mean.detach().to(torch.float64).cpu()
    running_var = layer.running_var.detach().to(torch.float64).cpu()
    mean_error = (mean.cpu() - running_mean).norm() / running_var.sqrt().norm().clamp_min(1e-12)
    var_error = (var.cpu() - running_var).norm() / running_var.norm().clamp_min(1e-12)
    return float((mean_error + var_error) / 2)


@dataclass(frozen=True)
class Measurement:
    """What one forward pass of the teacher over a set of images shows."""

    logits: torch.Tensor  # float32 N×classes
    target_agreement: float  # fraction with argmax == label
    bn_error: float | None  # mean relative BN statistics error over BN layers, None without BN layers
    bn_errors: list[float]  # the same per BN layer, in module order
    diversity: float  # mean within-class pairwise cosine distance of penultimate features (image space without a Linear)


@torch.no_grad()
def measure(network: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256, max_per_class: int = 256) -> Measurement:
    """Run the teacher once over ``images`` and compute the quality figures.

    BN statistics are accumulated over the whole set (not per batch), so the
    figure compares the synthetic population with the running statistics and
    does not include batch-sampling noise.
    """
    layers = batchnorm_layers(network)
    sums: dict[int, list[torch.Tensor]] = {i: [0, 0] for i in range(len(layers))}
    features: list[torch.Tensor] = []
    handles = []

    def statistics_hook(index: int):
        def hook(module, inputs, output):
            first, second = channel_moments(inputs[0].to(torch.float64))
            sums[index][0] = sums[index][0] + first.sum(0)
            sums[index][1] = sums[index][1] + second.sum(0)

        return hook

    classifier = last_linear(network)
    try:
        for index, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(statistics_hook(index)))
        if classifier is not None:
            handles.append(classifier.register_forward_hook(lambda m, inputs, out: features.append(inputs[0].reshape(len(inputs[0]), -1).float().cpu())))
        device = next((p.device for p in network.parameters()), images.device)
        logits = torch.cat([network(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)])
    finally:
        for handle in handles:
            handle.remove()

    labels = labels.cpu()
    errors = []
    for index, layer in enumerate(layers):
        mean = sums[index][0] / len(images)
        var = (sums[index][1] / len(images) - mean.square()).clamp_min(0)
        errors.append(relative_statistics_error(mean, var, layer))
    space = torch.cat(features) if classifier is not None else images.reshape(len(images), -1).float().cpu()
    return Measurement(
        logits=logits,
        target_agreement=float((logits.argmax(1) == labels).float().mean()),
        bn_error=sum(errors) / len(errors) if errors else None,
        bn_errors=errors,
        diversity=within_class_diversity(space, labels, max_per_class),
    )


def within_class_diversity(vectors: torch.Tensor, labels: torch.Tensor, max_per_class: int = 256) -> float:
    """Mean pairwise cosine distance 1 − cos(u, v) within each class (first ``max_per_class`` of each), averaged over classes."""
    distances = []
    for label in labels.unique():
        members = torch.nn.functional.normalize(vectors[labels == label][:max_per_class].double(), dim=1)
        n = len(members)
        if n < 2:
            continue
        similarity = members @ members.T
        mean_off_diagonal = (similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1))
        distances.append(float(1 - mean_off_diagonal))
    return sum(distances) / len(distances) if distances else 0.0
