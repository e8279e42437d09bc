"""DeepInversion: images whose BatchNorm statistics match the teacher's running statistics.

A batch x̂ (in the teacher's normalised input space) is optimised with Adam on

    L(x̂) = CE(f(x̂), y) + a_bn · Σ_l m_l (‖μ_l(x̂) − μ_l‖₂ + ‖σ²_l(x̂) − σ²_l‖₂) + a_tv · TV(x̂) + a_l2 · ‖x̂‖²

where μ_l(x̂), σ²_l(x̂) are the batch statistics of the input of BN layer l,
μ_l, σ²_l its running statistics, and m_l = m_1 for the first BN layer in forward
order, 1 for the others; (a_bn, m_1) is one of ``SynthConfig.bn_weightings``. Each step sees a random jitter
(a roll of up to ``jitter`` pixels) and a random horizontal flip.

The published recipe (2k iterations per batch) costs seconds per image on a CPU.
This module spends a few dozen iterations per image (about 35 on the zoo
teachers with the defaults), made to count by

- a low-resolution warm start: for the first part of its life an image is a
  coarse tensor upsampled (bilinear) to the input size, so coarse shapes form
  in few steps; then the full-resolution tensor takes over;
- a large learning rate with a cosine schedule per image;
- a pool of images rather than a fixed batch: each slot of the batch holds one
  image with its own iteration count, Adam state and schedule; an image that is
  confident (teacher probability of its class ≥ ``stop_confidence``) after
  ``min_iterations`` is finished, and its slot is refilled with a fresh image,
  so the batch stays full and no step is spent on finished images;
- classes interleaved so that every batch holds all classes;
- gradients with respect to the images only (the teacher's weights are
  frozen), channels-last convolutions, and a fused backward for the batch
  statistics.

The pool engine (:func:`optimise_images`) is shared with Data Impression, which
supplies another per-image objective and no BN term.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from edgesnn.artifacts import Normalize, Progress

from .quality import batchnorm_layers

if TYPE_CHECKING:
    from . import SynthConfig

_ADAM_BETAS = (0.5, 0.9)  # short schedules need a responsive Adam (DeepInversion's ImageNet setting)
_ADAM_EPSILON = 1e-8


@dataclass(frozen=True)
class Objective:
    """The per-image part of a synthesis loss, and when an image is done."""

    image_losses: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits B×K, targets B×…) -> loss per image, B
    finished: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, targets) -> bool B, may stop early


@dataclass(frozen=True)
class PoolResult:
    """Images out of the pool engine, in queue order."""

    images: torch.Tensor  # N×C×H×W, normalised input space
    iterations: torch.Tensor  # int64 N, teacher evaluations each image received


def class_balanced_labels(count: int, num_classes: int) -> torch.Tensor:
    """``count`` labels spread evenly over classes (the remainder to the first), interleaved 0,1,…,K−1,0,1,…."""
    per_class = torch.full((num_classes,), count // num_classes)
    per_class[: count % num_classes] += 1
    rounds = torch.arange(int(per_class.max()))[:, None].expand(-1, num_classes)
    classes = torch.arange(num_classes)[None, :].expand_as(rounds)
    return classes[rounds < per_class[None, :]].reshape(-1).clone()


def pixel_bounds(normalize: Normalize | None, channels: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel (low, high) of valid pixels [0, 1] in the normalised space, shaped 1×C×1×1; None when unknown."""
    if normalize is None:
        return None
    mean, std = (torch.tensor(v, dtype=torch.float32) for v in normalize)
    if mean.numel() == 1:
        mean, std = mean.expand(channels), std.expand(channels)
    return ((0 - mean) / std).reshape(1, -1, 1, 1), ((1 - mean) / std).reshape(1, -1, 1, 1)


class _BatchMoments(torch.autograd.Function):
    """Per-channel mean and (biased) variance of x over every dimension but 1: the batch statistics of a BN input.

    Forward: the single-pass kernel BatchNorm's training mode uses
    (``batch_norm_update_stats``, 3–7× faster on channels-last activations than
    ``mean`` plus ``vector_norm``). Backward, in one fused pass over the activation
    instead of autograd's five: ∂/∂x = g_mean / n + 2 g_var (x − μ) / n, per channel.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, variance = torch.batch_norm_update_stats(x, None, None, 0.0)
        ctx.save_for_backward(x, mean)
        ctx.count = x.numel() // x.shape[1]
        return mean, variance

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor, grad_variance: torch.Tensor) -> torch.Tensor:
        x, mean = ctx.saved_tensors
        shape = (1, -1) + (1,) * (x.dim() - 2)
        slope = 2 * grad_variance / ctx.count
        return torch.addcmul((grad_mean / ctx.count - slope * mean).reshape(shape), x, slope.reshape(shape))


class BatchNormMatching:
    """Forward hooks that add up the BN statistics term of the DeepInversion loss.

    After a forward pass, :meth:`take_loss` returns
    Σ_l m_l (‖μ̂_l − μ_l‖₂ + ‖σ̂²_l − σ²_l‖₂) over the batch. The norms are absolute,
    as published: dividing them by ‖σ_l‖ and ‖σ²_l‖ (so that small-scale layers
    count as much as the first) lowered the relative BN error of deep layers but
    calibrated the SNN worse on the zoo ResNet (T=16: 81.8% against 86.6%).
    """

    def __init__(self, network: nn.Module, first_multiplier: float):
        self.first_multiplier = first_multiplier
        self.first_layer: nn.Module | None = None  # found on the first forward pass
        self.terms: list[torch.Tensor] = []
        self._handles = [layer.register_forward_hook(self._hook) for layer in batchnorm_layers(network)]

    def _hook(self, module: nn.modules.batchnorm._BatchNorm, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if self.first_layer is None:
            self.first_layer = module
        mean, variance = _BatchMoments.apply(inputs[0])
        mean_error = torch.linalg.vector_norm(mean - module.running_mean)
        var_error = torch.linalg.vector_norm(variance - module.running_var)
        self.terms.append((mean_error + var_error) * (self.first_multiplier if module is self.first_layer else 1.0))

    def take_loss(self) -> torch.Tensor | float:
        """The BN term of the last forward pass (and forget it)."""
        loss = sum(self.terms) if self.terms else 0.0
        self.terms = []
        return loss

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextmanager
def frozen(network: nn.Module) -> Iterator[nn.Module]:
    """Eval mode, no weight gradients, channels-last weights and affine BatchNorm for the duration; all restored after.

    Channels-last convolutions run ~1.4× faster than NCHW here (2-core CPU,
    zoo models, batch 128, forward + input gradient). An eval-mode BatchNorm is
    y = s·x + t per channel; computed as that (one fused pass forward, one
    multiply backward) instead of through ``native_batch_norm`` it costs about
    half, and its forward hooks still see the same input.
    """
    was_training = network.training
    parameters = list(network.parameters())
    flags = [p.requires_grad for p in parameters]
    layouts = [p.data for p in parameters]
    network.eval()
    for parameter in parameters:
        parameter.requires_grad_(False)
    network.to(memory_format=torch.channels_last)
    affine = batchnorm_layers(network)
    for layer in affine:
        layer.forward = _affine_batchnorm(layer)
    try:
        yield network
    finally:
        for layer in affine:
            del layer.forward
        for parameter, flag, data in zip(parameters, flags, layouts):
            parameter.data = data
            parameter.requires_grad_(flag)
        network.train(was_training)


def _affine_batchnorm(layer: nn.modules.batchnorm._BatchNorm) -> Callable[[torch.Tensor], torch.Tensor]:
    """The eval-mode forward of ``layer`` as s·x + t (running statistics and affine parameters as they are now)."""
    with torch.no_grad():
        scale = torch.rsqrt(layer.running_var.float() + layer.eps)
        if layer.weight is not None:
            scale = scale * layer.weight
        shift = -layer.running_mean.float() * scale
        if layer.bias is not None:
            shift = shift + layer.bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.reshape(shape), x, scale.reshape(shape))

    return forward


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Per image: mean squared difference between horizontal and between vertical neighbours."""
    vertical = (x[:, :, 1:, :] - x[:, :, :-1, :]).square().flatten(1).mean(1)
    horizontal = (x[:, :, :, 1:] - x[:, :, :, :-1]).square().flatten(1).mean(1)
    return vertical + horizontal


def _adam_step(value, gradient, first, second, steps, rate, mask):
    """One Adam update, applied only where ``mask`` (per image); ``steps`` and ``rate`` per image."""
    beta1, beta2 = _ADAM_BETAS
    shape = (-1,) + (1,) * (value.dim() - 1)
    keep = mask.reshape(shape)
    first = torch.where(keep, beta1 * first + (1 - beta1) * gradient, first)
    second = torch.where(keep, beta2 * second + (1 - beta2) * gradient.square(), second)
    steps = steps.to(value.dtype).clamp_min(1).reshape(shape)
    update = (first / (1 - beta1**steps)) / ((second / (1 - beta2**steps)).sqrt() + _ADAM_EPSILON)
    value = torch.where(keep, value - rate.reshape(shape) * update, value)
    return value, first, second


def optimise_images(
    network: nn.Module,
    targets: torch.Tensor,
    input_shape: tuple[int, int, int],
    normalize: Normalize | None,
    config: SynthConfig,
    objective: Objective,
    generator: torch.Generator,
    progress: Progress,
    batchnorm: BatchNormMatching | None = None,
    bn_weight: float = 0.0,
) -> PoolResult:
    """Optimise ``len(targets)`` images through a pool of ``batch_size`` slots (see module docstring).

    ``targets[i]`` is what image i is optimised towards (a label, or a soft
    target row); images come back in the same order. Every image gets at most
    ``config.iterations`` teacher evaluations, and at least ``min_iterations``.
    """
    count = len(targets)
    channels, height, width = input_shape
    device = targets.device
    slots = min(config.batch_size, count)
    scale = config.warm_start_scale
    warm_iterations = int(round(config.iterations * config.warm_start_fraction)) if scale > 1 else 0
    low_shape = (slots, channels, math.ceil(height / scale), math.ceil(width / scale))
    bounds = pixel_bounds(normalize, channels)
    if bounds is not None:
        bounds = tuple(b.to(device) for b in bounds)
    min_iterations = min(config.min_iterations, config.iterations - 1)

    def clip(x: torch.Tensor) -> torch.Tensor:
        return x if bounds is None else torch.maximum(torch.minimum(x, bounds[1]), bounds[0])

    def upsample(low: torch.Tensor) -> torch.Tensor:
        return F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)

    def noise(shape: tuple[int, ...]) -> torch.Tensor:
        return clip(torch.randn(shape, generator=generator).to(device))

    full = torch.zeros((slots, channels, height, width), device=device)
    low = torch.zeros(low_shape, device=device)
    full_moments = [torch.zeros_like(full), torch.zeros_like(full)]
    low_moments = [torch.zeros_like(low), torch.zeros_like(low)]
    steps = torch.zeros(slots, dtype=torch.long, device=device)  # teacher evaluations so far, per slot
    item = torch.full((slots,), -1, dtype=torch.long, device=device)  # queue index per slot, -1: idle companion
    best = torch.zeros_like(full)
    best_loss = torch.full((slots,), math.inf, device=device)
    images = torch.zeros((count, channels, height, width), device=device)
    iterations = torch.zeros(count, dtype=torch.long, device=device)
    queued = 0
    emitted = 0

    def refill(slot_mask: torch.Tensor) -> None:
        """Start fresh images in the given slots while the queue lasts; others become idle companions."""
        nonlocal queued
        chosen = slot_mask.nonzero().flatten()
        start = min(queued, count)
        new = min(len(chosen), count - start)
        item[chosen] = -1
        item[chosen[:new]] = torch.arange(start, start + new, device=device)
        queued = start + new
        fresh = chosen[:new]
        if new == 0:
            return
        if warm_iterations > 0:
            low[fresh] = noise((new,) + low_shape[1:])
            full[fresh] = clip(upsample(low[fresh]))
        else:
            full[fresh] = noise((new, channels, height, width))
        for moment in full_moments + low_moments:
            moment[fresh] = 0
        steps[fresh] = 0
        best_loss[fresh] = math.inf

    refill(torch.ones(slots, dtype=torch.bool, device=device))
    while True:
        active = item >= 0
        if not bool(active.any()):
            break
        warm = active & (steps < warm_iterations)
        slot_targets = targets[item.clamp_min(0)]
        full.requires_grad_(True)
        parameters = [full]
        x = full
        if bool(warm.any()):
            low.requires_grad_(True)
            parameters.append(low)
            x = torch.where(warm[:, None, None, None], upsample(low), full)
        shift_y, shift_x = (int(v) for v in torch.randint(-config.jitter, config.jitter + 1, (2,), generator=generator))
        augmented = torch.roll(x, shifts=(shift_y, shift_x), dims=(2, 3))
        if config.flip and bool(torch.rand((), generator=generator) < 0.5):
            augmented = augmented.flip(3)
        logits = network(augmented)
        per_image = objective.image_losses(logits, slot_targets)
        if config.tv_weight:
            per_image = per_image + config.tv_weight * total_variation(x)
        if config.l2_weight:
            per_image = per_image + config.l2_weight * x.square().flatten(1).mean(1)
        loss = (per_image * active).sum() / slots
        if batchnorm is not None:
            loss = loss + bn_weight * batchnorm.take_loss()
        gradients = torch.autograd.grad(loss, parameters, allow_unused=True)

        with torch.no_grad():
            full = full.detach()
            low = low.detach()
            current = x.detach()
            losses = per_image.detach()
            eligible = active & (steps >= min_iterations) & (losses < best_loss)
            best = torch.where(eligible[:, None, None, None], current, best)
            best_loss = torch.where(eligible, losses, best_loss)
            steps += active.long()
            done = active & ((steps >= config.iterations) | ((steps > min_iterations) & objective.finished(logits.detach(), slot_targets)))
            if bool(done.any()):
                finished = done.nonzero().flatten()
                images[item[finished]] = torch.where(torch.isfinite(best_loss[finished])[:, None, None, None], best[finished], current[finished])
                iterations[item[finished]] = steps[finished]
                emitted += len(finished)
                progress("synth", emitted, count)

            rate = config.lr * 0.5 * (1 + torch.cos(math.pi * (steps - 1).clamp_min(0).float() / config.iterations))
            updating = active & ~done
            if len(gradients) > 1:
                low_update = updating & warm
                low, low_moments[0], low_moments[1] = _adam_step(low, gradients[1], *low_moments, steps, rate, low_update)
                low = clip(low)
                ending = low_update & (steps == warm_iterations)
                full = torch.where(ending[:, None, None, None], clip(upsample(low)), full)
            full_update = updating & ~warm
            full, full_moments[0], full_moments[1] = _adam_step(full, gradients[0], *full_moments, steps - warm_iterations, rate, full_update)
            full = clip(full)
            if bool(done.any()):
                refill(done)
    return PoolResult(images=images, iterations=iterations)


def class_objective(config: SynthConfig) -> Objective:
    """Cross-entropy towards each image's label; finished once the network gives it ``stop_confidence``."""

    def image_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, reduction="none")

    def finished(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return logits.softmax(1).gather(1, targets[:, None]).squeeze(1) >= config.stop_confidence

    return Objective(image_losses, finished)


def soft_class_objective(config: SynthConfig) -> Objective:
    """Cross-entropy towards a soft target y (rows: label in column 0, y after it), −Σ_k y_k·log p_k;
    finished once max_k |p_k − y_k| ≤ 1 − ``stop_confidence``, which for a one-hot y is exactly
    ``class_objective``'s rule (p_label ≥ stop_confidence)."""
    tolerance = 1 - config.stop_confidence

    def image_losses(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return -(rows[:, 1:] * F.log_softmax(logits, dim=1)).sum(1)

    def finished(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return (logits.softmax(1) - rows[:, 1:]).abs().amax(1) <= tolerance + 1e-6

    return Objective(image_losses, finished)


def boundary_targets(labels: torch.Tensor, similarity: torch.Tensor | None, share: float, generator: torch.Generator) -> torch.Tensor | None:
    """Soft targets for a share of the images, or None when ``share`` is 0.

    Every image starts one-hot on its label. Each image whose draw falls below
    ``share`` gets y = λ·e_label + (1 − λ)·e_other instead, λ ~ U(0.5, 1), the
    other class drawn with probability proportional to its similarity to the
    label (``similarity``: K×K, the diagonal ignored; None: uniform): an image on
    the way from one class to a class the teacher finds alike, near the decision
    boundary that a student distilled from confident images never sees.
    Returns N×(1 + K) rows (label, target), as ``soft_class_objective`` reads them.
    """
    if share <= 0:
        return None
    count, classes = len(labels), (similarity.shape[0] if similarity is not None else int(labels.max()) + 1)
    weights = torch.ones(classes, classes) if similarity is None else similarity.float().clone()
    weights.fill_diagonal_(0)
    chosen = torch.rand(count, generator=generator) < share
    other = torch.multinomial(weights[labels.cpu()], 1, generator=generator).squeeze(1)
    keep = 0.5 + 0.5 * torch.rand(count, generator=generator)
    keep = torch.where(chosen, keep, torch.ones(count))
    targets = keep[:, None] * F.one_hot(labels.cpu(), classes).float() + (1 - keep)[:, None] * F.one_hot(other, classes).float()
    return torch.cat([labels.cpu()[:, None].float(), targets], dim=1).to(labels.device)


def synthesize_images(
    network: nn.Module,
    labels: torch.Tensor,
    input_shape: tuple[int, int, int],
    normalize: Normalize | None,
    config: SynthConfig,
    weighting: tuple[float, float],
    generator: torch.Generator,
    progress: Progress,
    targets: torch.Tensor | None = None,
) -> PoolResult:
    """DeepInversion images for ``labels`` with BN weighting (a_bn, m_1) (see module docstring); the network must be frozen and have BN layers.

    ``targets`` (rows of ``boundary_targets``) aims the images at soft targets instead of their labels.
    """
    bn_weight, first_multiplier = weighting
    batchnorm = BatchNormMatching(network, first_multiplier)
    aims, objective = (labels, class_objective(config)) if targets is None else (targets, soft_class_objective(config))
    try:
        return optimise_images(network, aims, input_shape, normalize, config, objective, generator, progress, batchnorm, bn_weight)
    finally:
        batchnorm.remove()
