"""Data Impression (Nayak et al., 2019): images for teachers without BatchNorm.

The classifier's weight rows w_k say which classes the teacher finds alike:

    S_kj = cos(w_k, w_j),   s_c = (S_c − min S_c) / (max S_c − min S_c) + ε

For an image of class c a soft target is drawn, y ~ Dirichlet(β · s_c), and the
image minimises the cross-entropy at temperature τ

    L(x̂) = −Σ_k y_k · log softmax(f(x̂) / τ)_k  (+ a_tv · TV(x̂) + a_l2 · ‖x̂‖²)

Half the images use each β of ``dirichlet_betas`` when two are given (the paper
uses β = 1 and β = 0.1, τ = 20). A draw is kept only if its largest entry is
class c, so every label names the class the image was made for (a deviation
from the paper, which labels by c whatever the draw); classes stay balanced.
Optimisation runs through the same pool engine as DeepInversion, with jitter,
flips and the low-resolution warm start; an image may stop once the teacher's
argmax is its class after ``min_iterations``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from edgesnn.artifacts import Normalize, Progress

from .deepinversion import Objective, PoolResult, optimise_images

if TYPE_CHECKING:
    from . import SynthConfig


def class_similarity(classifier: nn.Linear, epsilon: float) -> torch.Tensor:
    """K×K concentrations s: row c is the cosine similarity of class c to every class, min-max normalised, plus ε."""
    rows = F.normalize(classifier.weight.detach().double().cpu(), dim=1)
    similarity = rows @ rows.T
    low = similarity.amin(dim=1, keepdim=True)
    high = similarity.amax(dim=1, keepdim=True)
    return (similarity - low) / (high - low).clamp_min(1e-12) + epsilon


def sample_dirichlet(concentration: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rows y ~ Dirichlet(concentration row), stable for tiny concentrations.

    Uses Gamma(α) = Gamma(α + 1) · U^(1/α) in log space, so entries that would
    underflow as plain Gamma samples still normalise correctly.
    """
    alpha = concentration.double()
    gamma = torch._standard_gamma(alpha + 1, generator=generator)
    uniform = torch.rand(alpha.shape, generator=generator, dtype=torch.float64).clamp_min(1e-300)
    log_gamma = gamma.log() + uniform.log() / alpha
    return torch.softmax(log_gamma, dim=-1)


def soft_targets(labels: torch.Tensor, similarity: torch.Tensor, betas: tuple[float, ...], generator: torch.Generator) -> torch.Tensor:
    """One Dirichlet soft target per label (β alternating over ``betas``), redrawn until its argmax is the label."""
    betas_per_image = torch.tensor(betas, dtype=torch.float64)[torch.arange(len(labels)) % len(betas)]
    concentration = betas_per_image[:, None] * similarity[labels]
    targets = sample_dirichlet(concentration, generator)
    for _ in range(1000):
        wrong = (targets.argmax(1) != labels).nonzero().flatten()
        if len(wrong) == 0:
            break
        targets[wrong] = sample_dirichlet(concentration[wrong], generator)
    else:
        wrong = targets.argmax(1) != labels  # practically unreachable: fall back to a one-hot target
        targets[wrong] = F.one_hot(labels[wrong], similarity.shape[1]).double()
    return targets.float()


def synthesize_images(
    network: nn.Module,
    classifier: nn.Linear,
    labels: torch.Tensor,
    input_shape: tuple[int, int, int],
    normalize: Normalize | None,
    config: SynthConfig,
    generator: torch.Generator,
    progress: Progress,
) -> PoolResult:
    """Data Impression images for ``labels`` (see module docstring); the network must be frozen."""
    similarity = class_similarity(classifier, config.similarity_epsilon)
    targets = soft_targets(labels.cpu(), similarity, config.dirichlet_betas, generator).to(labels.device)
    # the pool engine hands each slot its row of ``table``: the label in column 0, the soft target after it
    table = torch.cat([labels[:, None].float(), targets], dim=1)
    temperature = config.temperature

    def image_losses(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return -(rows[:, 1:] * F.log_softmax(logits / temperature, dim=1)).sum(1)

    def finished(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1) == rows[:, 0].long()

    return optimise_images(network, table, input_shape, normalize, config, Objective(image_losses, finished), generator, progress)
