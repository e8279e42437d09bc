"""The synth stage: data-free images from the teacher alone.

    synthesize(teacher, SynthConfig()) -> SyntheticSet

DeepInversion (:mod:`.deepinversion`) for teachers with BatchNorm, Data
Impression (:mod:`.data_impression`) for teachers without; quality figures from
:mod:`.quality`; a PNG preview grid from :func:`preview_png`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
import torch

from edgesnn import distributed
from edgesnn.artifacts import Progress, SyntheticSet, Teacher, no_progress
from edgesnn.errors import SynthError

from . import data_impression, deepinversion
from .deepinversion import class_balanced_labels, frozen
from .png import encode_png, preview_png
from .quality import batchnorm_layers, last_linear, measure

__all__ = ["METHODS", "SynthConfig", "encode_png", "invert", "preview_png", "synthesize"]

METHODS = ("auto", "deepinversion", "data_impression")
UNIT_SEED_STRIDE = 1_000_003  # work unit u draws its noise, jitter and flips from seed + u·stride
BOUNDARY_SEED_OFFSET = 7_777  # the boundary targets are drawn from seed + this
UNIT_BATCHES = 4  # a work unit is at most this many pool batches of images (4 × 128 = 512 by default)


@dataclass(frozen=True)
class SynthConfig:
    """How to synthesise images; the defaults were tuned on the two zoo teachers on a 2-core CPU."""

    count: int = 2048  # images in all, class-balanced (spread evenly, the remainder to the first classes)
    method: str = "auto"  # "auto" (DeepInversion if the teacher has BatchNorm, else Data Impression), "deepinversion", "data_impression"
    batch_size: int = 128  # images optimised together, BN statistics matched over them (128: as fast per image as 256)
    iterations: int = 64  # most teacher evaluations (Adam steps) an image gets
    min_iterations: int = 32  # fewest before an image may stop: DeepInversion once confident, Data Impression once argmax is its class
    lr: float = 0.2  # Adam learning rate at the start of each image's cosine schedule (normalised input space)
    seed: int = 0  # seeds noise, jitter, flips and soft targets: same seed and config, same images (same machine and threads)
    # DeepInversion's BN statistics term, as (a_bn, m_1) pairs: a_bn its weight, m_1 an extra factor on the first BN
    # layer in forward order. The images are split evenly among the pairs (in order), each share optimised in its
    # own pool. The default mixes edgesnn's earlier weighting (1, ×10 first layer: confident, easy images) with the
    # published CIFAR-10 one (10, every layer alike: harder, more varied images). On the zoo ResNet the mix lifts
    # private T=1 from 60.2 to 74.1 (10 alone: 76.3); on the VGG it costs 0.5 (86.8 → 86.4; 10 alone: 86.1)
    # (BENCHMARKS.md, private_binary_fmnist, sessions 8 and 9).
    bn_weightings: tuple[tuple[float, float], ...] = ((1.0, 10.0), (10.0, 1.0))
    # Share of DeepInversion images aimed at a two-class soft target λ·label + (1 − λ)·(a class the teacher finds
    # alike), λ ~ U(0.5, 1), instead of their label alone: images near the teacher's decision boundaries.
    boundary_share: float = 0.0
    tv_weight: float = 1e-2  # a_tv, weight of the total variation prior (mean squared neighbour difference)
    l2_weight: float = 0.0  # a_l2, weight of the mean squared pixel value prior
    jitter: int = 2  # random roll of up to this many pixels each step
    flip: bool = True  # random horizontal flip each step
    warm_start_scale: int = 2  # an image starts as an (H/scale)×(W/scale) tensor upsampled bilinearly; 1 disables
    warm_start_fraction: float = 0.25  # share of ``iterations`` spent at low resolution
    stop_confidence: float = 0.9  # DeepInversion: an image may stop once the teacher gives its class this probability
    dirichlet_betas: tuple[float, ...] = (1.0, 0.1)  # Data Impression: Dirichlet scales β, the images split evenly among them
    temperature: float = 20.0  # Data Impression: softmax temperature τ of the soft-target cross-entropy
    similarity_epsilon: float = 0.01  # Data Impression: ε added to the normalised class similarities


def _check_config(config: SynthConfig) -> None:
    """Raise SynthError (one line) for a configuration that cannot work."""
    positive_integers = ("count", "batch_size", "iterations", "warm_start_scale")
    for name in positive_integers:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise SynthError(f"config {name}={value!r}: expected a positive integer")
    if config.method not in METHODS:
        raise SynthError(f"config method={config.method!r}: expected one of {', '.join(METHODS)}")
    if not isinstance(config.min_iterations, int) or not 0 <= config.min_iterations <= config.iterations:
        raise SynthError(f"config min_iterations={config.min_iterations!r}: expected an integer from 0 to iterations ({config.iterations})")
    if not isinstance(config.jitter, int) or config.jitter < 0:
        raise SynthError(f"config jitter={config.jitter!r}: expected a non-negative integer")
    checks = {
        "lr": config.lr > 0,
        "tv_weight": config.tv_weight >= 0,
        "l2_weight": config.l2_weight >= 0,
        "warm_start_fraction": 0 <= config.warm_start_fraction < 1,
        "stop_confidence": 0 < config.stop_confidence <= 1,
        "boundary_share": 0 <= config.boundary_share <= 1,
        "temperature": config.temperature > 0,
        "similarity_epsilon": config.similarity_epsilon > 0,
    }
    expected = {
        "lr": "> 0",
        "warm_start_fraction": "in [0, 1)",
        "stop_confidence": "in (0, 1]",
        "boundary_share": "in [0, 1]",
        "temperature": "> 0",
        "similarity_epsilon": "> 0",
    }
    for name, ok in checks.items():
        value = getattr(config, name)
        if not ok or not math.isfinite(value):
            raise SynthError(f"config {name}={value!r}: expected a finite number {expected.get(name, '>= 0')}")
    weightings = config.bn_weightings
    if not weightings or not all(len(pair) == 2 and all(math.isfinite(v) and v >= 0 for v in pair) for pair in weightings):
        raise SynthError(f"config bn_weightings={weightings!r}: expected one or more (bn weight, first-layer factor) pairs of finite numbers >= 0")
    if not config.dirichlet_betas or not all(b > 0 and math.isfinite(b) for b in config.dirichlet_betas):
        raise SynthError(f"config dirichlet_betas={config.dirichlet_betas!r}: expected one or more finite numbers > 0")


def _units(count: int, parts: int, size: int) -> list[tuple[slice, int]]:
    """Work units (rows, part): ``range(count)`` cut into ``parts`` contiguous parts as even as can be,
    each cut into as few even chunks of at most ``size`` rows as it takes."""
    units = []
    for part in range(parts):
        start, stop = part * count // parts, (part + 1) * count // parts
        chunks = -(-(stop - start) // size)
        units += [(slice(start + k * (stop - start) // chunks, start + (k + 1) * (stop - start) // chunks), part) for k in range(chunks)]
    return units


def synthesize(teacher: Teacher, config: SynthConfig = SynthConfig(), progress: Progress = no_progress, device: str | torch.device = "cpu") -> SyntheticSet:
    """Synthesise ``config.count`` class-balanced images from the teacher alone.

    Uses ``teacher.network`` (eval-mode module; BatchNorm layers with running
    statistics), ``teacher.input_shape``, ``teacher.num_classes`` and
    ``teacher.normalize`` (images are clipped to valid pixels when it is known);
    the optimisation runs on ``device`` (the images come back on the CPU).
    Metrics: target_agreement, bn_error (teachers with BatchNorm only),
    diversity (penultimate-feature cosine distance within a class),
    images_per_second, seconds, iterations_mean. Progress is reported as
    ``("synth", images done, count)``.
    """
    _check_config(config)
    started = time.perf_counter()
    network = teacher.network.to(device)  # a fresh module: moving it leaves the teacher as it was
    input_shape = tuple(int(v) for v in teacher.input_shape)
    num_classes = int(teacher.num_classes)
    if len(input_shape) != 3 or min(input_shape) <= 0:
        raise SynthError(f"teacher input_shape={teacher.input_shape!r}: expected C,H,W")
    if num_classes < 1:
        raise SynthError(f"teacher num_classes={num_classes}: expected at least one class")
    if teacher.normalize is not None and any(len(v) not in (1, input_shape[0]) for v in teacher.normalize):
        raise SynthError(f"teacher normalize={teacher.normalize!r}: expected 1 or {input_shape[0]} values per side (one per channel)")
    has_batchnorm = bool(batchnorm_layers(network))
    method = config.method if config.method != "auto" else ("deepinversion" if has_batchnorm else "data_impression")
    if method == "deepinversion" and not has_batchnorm:
        raise SynthError("method deepinversion: the teacher has no BatchNorm layer with running statistics; use data_impression")
    classifier = last_linear(network)
    if method == "data_impression":
        if classifier is None:
            raise SynthError("method data_impression: the teacher has no nn.Linear layer to take class similarities from")
        if classifier.out_features != num_classes:
            raise SynthError(
                f"method data_impression: the last nn.Linear has {classifier.out_features} outputs, expected {num_classes} (one per class)"
            )

    device = next((p.device for p in network.parameters()), torch.device("cpu"))
    if config.count < distributed.world_size():
        raise SynthError(f"config count={config.count}: fewer images than the {distributed.world_size()} torchrun processes sharing them")
    # The images are made in work units that do not depend on how many processes share them:
    # each weighting's part of the (interleaved, so class-balanced) label list is cut into
    # chunks of at most UNIT_BATCHES pools, each optimised in its own pool from its own seed.
    # Under torchrun rank r makes units r, r + W, …; so N processes make the very images one
    # process makes, only faster.
    labels = class_balanced_labels(config.count, num_classes).to(device)
    # Drawn for the whole set from the seed alone, so that every process draws the same targets.
    boundary = None
    if method == "deepinversion" and config.boundary_share > 0:
        similarity = data_impression.class_similarity(classifier, config.similarity_epsilon) if classifier is not None and classifier.out_features == num_classes else None
        boundary = deepinversion.boundary_targets(labels, similarity, config.boundary_share, torch.Generator().manual_seed(config.seed + BOUNDARY_SEED_OFFSET))
    units = _units(config.count, len(config.bn_weightings) if method == "deepinversion" else 1, UNIT_BATCHES * config.batch_size)
    mine = [index for index in range(len(units)) if index % distributed.world_size() == distributed.rank()]
    total = sum(units[index][0].stop - units[index][0].start for index in mine)
    progress("synth", 0, total)
    images = torch.zeros((config.count, *input_shape))
    iterations = torch.zeros(config.count, dtype=torch.long)
    done = 0
    with frozen(network):
        for index in mine:
            rows, part = units[index]
            generator = torch.Generator().manual_seed(config.seed + UNIT_SEED_STRIDE * index)
            step = lambda task, finished, count, before=done: progress(task, before + finished, total)  # noqa: E731
            if method == "deepinversion":
                aims = None if boundary is None else boundary[rows]
                result = deepinversion.synthesize_images(network, labels[rows], input_shape, teacher.normalize, config, config.bn_weightings[part], generator, step, aims)
            else:
                result = data_impression.synthesize_images(network, classifier, labels[rows], input_shape, teacher.normalize, config, generator, step)
            images[rows] = result.images.detach().float().cpu()
            iterations[rows] = result.iterations.cpu()
            done += rows.stop - rows.start
        images = distributed.sum_over_ranks(images).to(device)  # each row is filled on one rank, zero on the others
        iterations = distributed.sum_over_ranks(iterations)
        quality = measure(network, images, labels)
    seconds = time.perf_counter() - started
    metrics = {
        "target_agreement": quality.target_agreement,
        "diversity": quality.diversity,
        "images_per_second": config.count / seconds,
        "seconds": seconds,
        "iterations_mean": float(iterations.float().mean()),
    }
    if quality.bn_error is not None:
        metrics["bn_error"] = quality.bn_error
    return SyntheticSet(
        images=images.cpu(),
        labels=labels.cpu(),
        teacher_logits=quality.logits.cpu(),
        method=method,
        metrics=metrics,
        config=dataclasses.asdict(config),
    )


def invert(
    network: torch.nn.Module,
    labels: torch.Tensor,
    input_shape: tuple[int, int, int],
    normalize,
    config: SynthConfig = SynthConfig(),
    progress: Progress = no_progress,
) -> torch.Tensor:
    """Class-representative images of any differentiable classifier: a model-inversion attacker.

    DeepInversion without the BatchNorm term (the attacked network need not have
    BN statistics: a BN-folded or spiking graph has none),

        L(x̂) = CE(f(x̂), y) + a_tv · TV(x̂) + a_l2 · ‖x̂‖²,

    through the same pool engine (jitter, flips, low-resolution warm start,
    per-image cosine schedule; an image may stop once ``f`` gives its class
    ``stop_confidence``). Returns N×C×H×W images in the normalised input space.
    """
    _check_config(config)
    generator = torch.Generator().manual_seed(config.seed)
    with frozen(network):
        result = deepinversion.optimise_images(network, labels, tuple(int(v) for v in input_shape), normalize, config, deepinversion.class_objective(config), generator, progress)
    return result.images.detach().float().cpu()
