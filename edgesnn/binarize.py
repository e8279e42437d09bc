"""Stage ``binarize``: adaptive local binarization (ALBSNN) of a one-timestep SNN.

A binarized layer computes with W_b = α·sign(W), α = mean |W| per output
channel (sign(0) = +1), so each output channel holds exactly two values and
costs one bit per weight plus one α. Every other conv/linear layer is int8
(symmetric, one scale per output channel).

Which layers? Each candidate layer l gets two loss estimates:

- the weight error e_l = ‖W − W_b‖² / ‖W‖² (cheap, data-free), and
- the measured drop d_l in agreement with the teacher, in points, on a
  held-out synthetic split when l alone is binarized (the others as they are).

Layers are binarized greedily, lowest d_l first (e_l breaks ties): binarize
one, fine-tune the whole network briefly with a straight-through estimator
(forward with W_b, gradient to the latent W), re-measure, and keep the
fine-tuned weights only if they agree with the teacher at least as often as
the untuned ones. A step whose
agreement falls more than ``max_loss`` points below the starting model's is
undone and that layer is skipped; the remaining candidates are re-estimated
after every accepted step, since fine-tuning changes what each would cost.
The search stops when no candidate fits or ``binary_fraction`` of all weights
are 1-bit. The first and last layers stay int8 by default: they are small
and the most sensitive. With ``size_ratio`` set, bytes the model may still
spend go back to int8 weights: in the binary layers, last binarized first
(the costliest the search accepted), the output channels with the highest
weight error become int8 again, while the deployed model stays at least
``size_ratio`` times smaller than the fp32 teacher. A layer left with both
kinds of channel has format "mixed" (its ``binary_rows`` attribute lists the
1-bit ones). A final fine-tune with every layer in its deployed format closes
the gap.

Every fine-tune distils the ANN's outputs and also matches currents: the loss
adds γ·Σ_l ‖I_l − I_l^float‖² / ‖I_l^float‖² / L, I_l the input current of
spiking layer l and I_l^float that of the float model the stage started from,
on the same batch. On the synthetic images the ANN's outputs alone are matched
almost perfectly (held-out agreement ≥ 99.8%) by binary networks whose currents
have drifted from the float model's, and real images expose the drift: on the
widest robust VGG the matching (γ = 1) cut the real-image cost of binarization
by ~0.4 points (BENCHMARKS.md, session 22). The stage starts from the private
model without the output-bias offsets privatize calibrated
(``privatize.without_output_bias``) and, after the final fine-tune, fits them
afresh on noisy synthetic images (``privatize.calibrate_output_bias``): +0.2 to
+0.5 on the binary models measured (BENCHMARKS.md, sessions 23–24).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import torch

from . import distributed, neuron_kernel
from .artifacts import Progress, SpikingModel, SyntheticSet, Teacher, no_progress
from .errors import BinarizeError
from .graph import fold_batchnorm
from .privatize import TrainConfig, agreement, binary_rows, binary_weight, binary_weight_count, calibrate_output_bias, check_device, quantize, split_holdout, teacher_logits, train_spiking, without_output_bias


@dataclass(frozen=True)
class BinarizeConfig:
    """Greedy per-layer binarization within an agreement budget."""

    # Agreement points (on the held-out synthetic split) binarization may cost. 6, not 3: on the zoo models at the
    # standard budget 6 made 24-48% more of the weights 1-bit for 0.9-1.3 points of real accuracy; the mixed
    # synthetic images are harder to agree on than real ones. How synthetic points map to real ones varies with the
    # set: another ResNet set went to 87% 1-bit for 12.9 points (BENCHMARKS.md, private_binary_fmnist, session 9).
    max_loss: float = 6.0
    binary_fraction: float | None = None  # stop once this share of all conv/linear weights is 1-bit; None: as many as fit
    keep_first_last: bool = True  # first and last conv/linear layers stay int8
    step_steps: int = 80  # fine-tuning steps after each binarized layer
    final_steps: int = 300  # fine-tuning steps at the end, every layer in its deployed format
    holdout: float = 0.1  # share of synthetic images held out for the measured estimator
    holdout_views: bool = True  # score each held-out image also flipped and shifted one pixel each way (6 views)
    # γ of current matching: every fine-tune also pulls each spiking layer's input currents towards those of the
    # float model the stage starts from (privatize._CurrentMatching); 0 turns it off. Session 22 (BENCHMARKS.md).
    current_weight: float = 1.0
    bias_noise: float = 0.3  # σ of the noise for the output bias calibrated at the end (privatize.calibrate_output_bias; 0: off)
    # After the layer search, int8 goes back to the binary layers' costliest output channels while the model stays
    # ≥ this many times smaller than the fp32 teacher (``channels_back``); None: off.
    size_ratio: float | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-4))


def holdout_views(images: torch.Tensor) -> torch.Tensor:
    """Each image as it is, mirrored left-right, and shifted one pixel up, down, left and right (edges
    replicated): 6·N images. The agreement decisions are made on all of them, so that an image near a
    decision boundary counts as a share of its views instead of all or nothing."""
    height, width = images.shape[-2:]
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate")
    shifted = [padded[..., 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))]
    return torch.cat([images, images.flip(-1), *shifted])


def _formats(model: SpikingModel) -> dict[str, str]:
    return {node.name: node.attrs.get("weight_format", "float") for node in model.graph.weighted()}


def _with_formats(model: SpikingModel, formats: dict[str, str]) -> SpikingModel:
    """The model with each layer's weights quantized to its format (latent weights kept aside by the caller).
    A "mixed" layer's binary output channels are its ``binary_rows`` attribute."""
    graph = model.graph.copy()
    for node in graph.weighted():
        node.params["weight"] = quantize(node.params["weight"], formats[node.name], node.attrs.get("binary_rows", ()))
        node.attrs["weight_format"] = formats[node.name]
    return replace(model, graph=graph)


# Ops through which a per-channel factor passes unchanged to the next weighted layer.
_CHANNELWISE = ("avgpool", "maxpool", "adaptive_avgpool", "global_mean", "identity")


def _carry_ratio(graph, node, ratio: torch.Tensor) -> torch.Tensor | None:
    """The per-channel factor on ``node``'s output given ``ratio`` on its input; None where channels mix."""
    source_shape = graph[node.inputs[0]].shape
    if node.op in _CHANNELWISE:
        return ratio
    if node.op == "slice" and node.attrs["dim"] != 1:
        return ratio
    if node.op == "pad":
        pad = list(node.attrs["pad"]) + [0] * (2 * len(source_shape) - len(node.attrs["pad"]))
        front, back = pad[-2:]  # F.pad order: the channel dimension comes last
        return torch.cat([torch.ones(front), ratio, torch.ones(back)])  # added channels are zero: any factor fits
    if node.op == "reshape" and len(source_shape) == 3 and len(node.shape) == 1 and ratio.numel() == source_shape[0]:
        return ratio.repeat_interleave(source_shape[1] * source_shape[2])  # flatten is channel-major
    return None


def _scale_rows(node, factor: torch.Tensor) -> None:
    """Multiply a conv/linear's output channels (weight rows and bias) by ``factor``."""
    weight = node.params["weight"]
    node.params["weight"] = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))
    node.params["bias"] = node.params.get("bias", torch.zeros(weight.shape[0])) * factor


def _rescale_add(graph, add, source: str, ratio: torch.Tensor, thresholds: dict[str, torch.Tensor]) -> bool:
    """Spikes from ``source`` now enter ``add`` divided by ``ratio`` (per channel). Divide the add's other
    inputs and the thresholds of the neurons it feeds by the same, which changes no spike. False (and
    nothing changed) where that is impossible: another input is not a conv/linear feeding only this add,
    or the add feeds something other than neurons."""
    others = [graph[name] for name in add.inputs if name != source]
    consumers = graph.consumers(add.name)
    if not consumers or any(node.op != "relu" for node in consumers):
        return False
    if any(node.op not in ("conv", "linear") or len(graph.consumers(node.name)) != 1 or node.params["weight"].shape[0] != ratio.numel() for node in others):
        return False
    for node in others:
        _scale_rows(node, 1 / ratio)
    for node in consumers:
        theta = thresholds[node.name]
        thresholds[node.name] = (theta if theta.dim() == 1 else theta.expand(ratio.numel())) / ratio
    return True


def shared_amplitudes(model: SpikingModel) -> tuple[SpikingModel, bool]:
    """One spike amplitude per layer, a = the mean of its per-channel amplitudes; thresholds stay per channel.

    A binary layer computes α·Σ sign(W)·x; only when its input x is one scale
    times a binary map can that run as popcounts on the device. A spike of
    channel c carried θ_c (r_c = θ_c/a times the new amplitude). Each
    conv/linear fed through channel-wise ops (pooling, padding, flatten)
    multiplies its input columns by r_c. Where the spikes enter a residual add
    directly, the add's other input (a conv) and the thresholds of the neurons
    after the add are divided by r_c instead. Either way no spike changes.
    Returns the model and whether the rewrite was exact everywhere (False
    where spikes met an op that mixes channels; fine-tuning then recovers).
    """
    graph = model.graph.copy()
    thresholds = {name: theta.clone() for name, theta in model.thresholds.items()}
    original = {name: model.amplitude(name).clone() for name in model.thresholds}
    amplitudes = dict(model.amplitudes)
    exact = True
    for neuron in graph.neurons():
        if neuron.name in model.amplitudes:
            continue
        amplitude = original[neuron.name]
        amplitudes[neuron.name] = amplitude.mean().reshape(())
        if amplitude.dim() == 0:
            continue
        pending = [(neuron.name, amplitude / amplitude.mean())]
        while pending:
            name, ratio = pending.pop()
            for consumer in graph.consumers(name):
                if consumer.op == "conv" and consumer.attrs.get("groups", 1) == 1 and consumer.params["weight"].shape[1] == ratio.numel():
                    consumer.params["weight"] = consumer.params["weight"] * ratio.reshape(1, -1, 1, 1)
                elif consumer.op == "linear" and consumer.params["weight"].shape[1] == ratio.numel():
                    consumer.params["weight"] = consumer.params["weight"] * ratio.reshape(1, -1)
                elif consumer.op == "add":
                    exact = _rescale_add(graph, consumer, name, ratio, thresholds) and exact
                else:
                    carried = _carry_ratio(graph, consumer, ratio)
                    exact = exact and carried is not None
                    if carried is not None:
                        pending.append((consumer.name, carried))
    return replace(model, graph=graph, thresholds=thresholds, amplitudes=amplitudes), exact


def weight_error(weight: torch.Tensor) -> float:
    """‖W − α·sign(W)‖² / ‖W‖²: the relative error binarization makes in a layer."""
    return float((weight - binary_weight(weight)).square().sum() / weight.square().sum().clamp_min(1e-12))


def binary_share(model: SpikingModel) -> float:
    """Share of all conv/linear weights that are 1-bit (a mixed layer's binary output channels count)."""
    total = sum(node.params["weight"].numel() for node in model.graph.weighted())
    return sum(binary_weight_count(node) for node in model.graph.weighted()) / max(1, total)


def model_bytes(model: SpikingModel) -> int:
    """Bytes the deployed model's parameters take: 1-bit weights packed 8 per byte plus one fp32 α per
    output channel, int8 weights plus one fp32 scale per output channel (a mixed layer: its binary
    channels packed, the others a byte a weight), fp32 for everything else (biases, thresholds,
    unfolded BatchNorm)."""
    total = 0
    for node in model.graph.nodes:
        for key, tensor in node.params.items():
            if key == "weight" and node.op in ("conv", "linear"):
                kind = node.attrs.get("weight_format", "float")
                channels = tensor.shape[0]
                if kind in ("binary", "int8", "mixed"):
                    binary = binary_weight_count(node)
                    total += -(-binary // 8) + (tensor.numel() - binary) + 4 * channels
                else:
                    total += 4 * tensor.numel()
            elif key not in ("running_mean", "running_var", "num_batches_tracked") or node.op == "batchnorm":
                total += 4 * tensor.numel()
    return total + 4 * sum(theta.numel() for theta in model.thresholds.values()) + 4 * len(model.amplitudes)


def teacher_bytes_fp32(teacher: Teacher) -> int:
    """Bytes of the teacher's weights as fp32 with BatchNorm folded (the smallest honest fp32 baseline)."""
    return 4 * sum(tensor.numel() for node in fold_batchnorm(teacher.graph).nodes for key, tensor in node.params.items() if key not in ("running_mean", "running_var", "num_batches_tracked"))


def row_errors(weight: torch.Tensor) -> torch.Tensor:
    """‖W_o − α_o·sign(W_o)‖² / ‖W_o‖² of each output channel o: what binarizing it costs, per channel."""
    rows = weight.reshape(weight.shape[0], -1)
    return (rows - binary_weight(weight).reshape_as(rows)).square().sum(1) / rows.square().sum(1).clamp_min(1e-12)


def channels_back(model: SpikingModel, formats: dict[str, str], order: list[str], budget: int, binary_floor: float = 0.0) -> tuple[SpikingModel, dict[str, str], list[dict]]:
    """Int8 back to output channels of binary layers while the deployed model takes at most ``budget`` bytes.

    Layers in the reverse of ``order`` (the order they were binarized in: the
    last cost the most agreement when the search took it); within a layer the
    channels of highest ``row_errors`` first. Stops at the first channel that
    does not fit, or that would leave less than ``binary_floor`` of all weights
    1-bit. ``model`` holds the latent weights; returns it with the new formats
    in its graph (a layer with both kinds of channel: "mixed", its 1-bit
    channels in the ``binary_rows`` attribute), the formats and a log per layer.
    """
    graph = model.graph.copy()
    formats = dict(formats)
    total = sum(node.params["weight"].numel() for node in graph.weighted())
    log = []

    def set_rows(node, rows: list[int]) -> None:
        channels = node.params["weight"].shape[0]
        kind = "binary" if len(rows) == channels else "int8" if not rows else "mixed"
        node.attrs["weight_format"] = formats[node.name] = kind
        node.attrs.pop("binary_rows", None)
        if kind == "mixed":
            node.attrs["binary_rows"] = sorted(rows)

    def fits() -> bool:
        deployed = replace(model, graph=graph)
        return model_bytes(deployed) <= budget and sum(binary_weight_count(n) for n in graph.weighted()) / max(1, total) >= binary_floor

    for node in graph.weighted():
        node.attrs["weight_format"] = formats[node.name]
    for name in reversed([name for name in order if formats[name] == "binary"]):
        node = graph[name]
        rows = list(range(node.params["weight"].shape[0]))
        back = []
        for row in row_errors(node.params["weight"]).argsort(descending=True).tolist():
            set_rows(node, [r for r in rows if r != row])
            if not fits():
                set_rows(node, rows)
                break
            rows.remove(row)
            back.append(row)
        log.append({"layer": name, "int8_channels": len(back), "binary_channels": len(rows)})
        if rows:  # the budget ran out inside this layer
            break
    return replace(model, graph=graph), formats, log


def _check(config: BinarizeConfig, model: SpikingModel, synthetic: SyntheticSet) -> None:
    if config.max_loss < 0:
        raise BinarizeError(f"max loss {config.max_loss} must be ≥ 0 agreement points")
    if config.binary_fraction is not None and not 0 < config.binary_fraction <= 1:
        raise BinarizeError(f"binary fraction {config.binary_fraction} must be in (0, 1]")
    if config.step_steps < 0 or config.final_steps < 0:
        raise BinarizeError("fine-tuning steps must be ≥ 0")
    if config.current_weight < 0:
        raise BinarizeError(f"current weight {config.current_weight} must be ≥ 0")
    if not 0 <= config.bias_noise < float("inf"):
        raise BinarizeError(f"bias noise {config.bias_noise} must be a finite σ ≥ 0")
    if not 0 < config.holdout < 0.5:
        raise BinarizeError(f"holdout {config.holdout} must be in (0, 0.5)")
    if config.size_ratio is not None and not 1 <= config.size_ratio < float("inf"):
        raise BinarizeError(f"size ratio {config.size_ratio} must be a finite number ≥ 1 (times smaller than the fp32 teacher)")
    if tuple(synthetic.images.shape[1:]) != tuple(model.input_shape):
        raise BinarizeError(f"synthetic images have shape {tuple(synthetic.images.shape[1:])} but the model expects {model.input_shape}")
    check_device(config.train.device)
    if len(model.graph.weighted()) == 0:
        raise BinarizeError("the model has no conv or linear layer to binarize")


def binarize(model: SpikingModel, teacher: Teacher, synthetic: SyntheticSet, config: BinarizeConfig = BinarizeConfig(), progress: Progress = no_progress) -> SpikingModel:
    """Binarize layers greedily within the agreement budget; every other weight layer becomes int8."""
    _check(config, model, synthetic)
    started = time.perf_counter()
    model = without_output_bias(model)  # fine-tuned as trained; the output bias is calibrated afresh at the end
    torch.manual_seed(config.train.seed)
    timesteps = model.timesteps
    train_index, held_index = split_holdout(synthetic.labels, config.holdout, config.train.seed)
    images, labels = synthetic.images[train_index], synthetic.labels[train_index]
    held_images = synthetic.images[held_index]
    if config.holdout_views and held_images.dim() == 4:
        held_images = holdout_views(held_images)
    held_teacher = teacher_logits(teacher, held_images).argmax(1)
    teacher_network = teacher.network

    weighted = model.graph.weighted()
    sizes = {node.name: node.params["weight"].numel() for node in weighted}
    total = sum(sizes.values())
    fixed = {weighted[0].name, weighted[-1].name} if config.keep_first_last else set()
    formats = {node.name: "int8" for node in weighted}

    # Start: one spike amplitude per layer, every layer int8, fine-tuned to the teacher so that
    # the budget is measured from there. ``current`` holds the latent float weights;
    # _with_formats gives what is deployed.
    start_agreement = agreement(model, held_images, held_teacher, timesteps)
    model, shared_exact = shared_amplitudes(model)
    shared_agreement = agreement(model, held_images, held_teacher, timesteps)
    matching = {"reference": model, "reference_weight": config.current_weight}  # the float currents every fine-tune keeps to
    current, _ = train_spiking(model, teacher_network, images, labels, timesteps, config.step_steps, config.train, formats, progress, "int8", latent=True, **matching)
    baseline = agreement(_with_formats(current, formats), held_images, held_teacher, timesteps)
    floor = baseline - config.max_loss / 100

    estimates: dict[str, dict] = {}
    steps_log = []
    candidates = [node.name for node in weighted if node.name not in fixed]
    step_number = 0
    while candidates:
        if config.binary_fraction is not None and sum(sizes[n] for n, f in formats.items() if f == "binary") / total >= config.binary_fraction:
            break
        # Estimate every remaining candidate on the current model.
        now = agreement(_with_formats(current, formats), held_images, held_teacher, timesteps)
        untuned = {}
        for name in candidates:
            untuned[name] = agreement(_with_formats(current, dict(formats, **{name: "binary"})), held_images, held_teacher, timesteps)
            estimates[name] = {
                "weight_error": round(weight_error(current.graph[name].params["weight"]), 5),
                "agreement_drop": round(100 * (now - untuned[name]), 3),
            }
        candidates.sort(key=lambda n: (estimates[n]["agreement_drop"], estimates[n]["weight_error"]))
        name = candidates.pop(0)
        step_number += 1
        trial_formats = dict(formats, **{name: "binary"})
        tuned, _ = train_spiking(
            current, teacher_network, images, labels, timesteps, config.step_steps, replace(config.train, seed=config.train.seed + step_number), trial_formats, progress, f"bin {step_number}", latent=True, **matching
        )
        reached = agreement(_with_formats(tuned, trial_formats), held_images, held_teacher, timesteps)
        tuning_kept = reached >= untuned[name]
        if not tuning_kept:  # the fine-tuning made this step worse: take the layer binarized as it was
            tuned, reached = current, untuned[name]
        accepted = reached >= floor
        steps_log.append({"layer": name, **estimates[name], "agreement_after": round(reached, 4), "fine_tuning_kept": tuning_kept, "accepted": accepted})
        if accepted:
            formats, current = trial_formats, tuned
    given_back = []
    if config.size_ratio is not None:
        budget = int(teacher_bytes_fp32(teacher) / config.size_ratio)
        output = model.graph[model.graph.output]
        if output.op == "linear" and "bias" not in output.params:  # the output-bias calibration may add one
            budget -= 4 * output.params["weight"].shape[0]
        order = [step["layer"] for step in steps_log if step["accepted"]]
        current, formats, given_back = channels_back(current, formats, order, budget, config.binary_fraction or 0.0)
    final_config = replace(config.train, seed=config.train.seed + 1000)
    current, losses = train_spiking(current, teacher_network, images, labels, timesteps, config.final_steps, final_config, formats, progress, "final", **matching)
    current = _with_formats(current, formats)  # idempotent on quantized weights; sets every layer's weight_format
    current, calibration = calibrate_output_bias(current, teacher, images, synthetic.images[held_index], config.bias_noise, config.train.temperature, config.train.seed)
    final_agreement = agreement(current, held_images, held_teacher, timesteps)

    layers = {}
    for node in current.graph.weighted():
        layers[node.name] = {
            "weight_format": formats[node.name],
            "weights": sizes[node.name],
            "fixed": node.name in fixed,
            **({"binary_channels": len(binary_rows(node)), "channels": node.params["weight"].shape[0]} if formats[node.name] == "mixed" else {}),
            **estimates.get(node.name, {}),
        }
    metrics = {
        "binary_fraction": round(binary_share(current), 5),
        "agreement_start": round(start_agreement, 4),
        "agreement_shared_amplitudes": round(shared_agreement, 4),
        "shared_amplitudes_exact": shared_exact,
        "agreement_int8": round(baseline, 4),
        "agreement_final": round(final_agreement, 4),
        "max_loss": config.max_loss,
        "steps": steps_log,
        "channels_back": given_back,
        "layers": layers,
        "final_training": losses,
        "output_bias": calibration,
        "neuron_kernel": neuron_kernel.mode(config.train.device, distributed.world_size()),
        "seconds": round(time.perf_counter() - started, 2),
    }
    config_record = dict(model.config, binarize=asdict(config))
    return replace(current, config=config_record, metrics=dict(model.metrics, binarize=metrics))


__all__ = ["BinarizeConfig", "binarize", "binary_share", "channels_back", "model_bytes", "row_errors", "shared_amplitudes", "teacher_bytes_fp32", "weight_error"]
