"""Stage ``audit``: how much the deployed SNN reveals about the data its teacher was trained on.

Class leakage (PrivateSNN, Kim et al. 2022) — two model-inversion attacks, each
turning a classifier f into class-representative images x̂_c by minimising

    L(x̂) = CE(f(x̂), c) + a_tv·TV(x̂) + a_l2·‖x̂‖²

(DeepInversion without its BatchNorm term: the attacked graphs have BN folded
away). The inversion itself is supplied by the caller (the pipeline passes
``edgesnn.synth.invert``), so this module depends on no synthesis code.

1. **Weight leakage.** The deployed weights are put back into the ANN
   architecture. A ``SpikingModel`` stores each layer's weights in the ANN's
   scale — a spike of neuron l carries the amplitude a_l, so the deployed
   binary-spike form W_l·a_{l−1}/θ_l is de-scaled by θ_l/a_{l−1} — and rate
   coding makes a spiking layer approximate out_l = (a_l/θ_l)·clip(I_l, 0, θ_l).
   The attacker's ANN is therefore the SNN graph with every neuron replaced by
   the scaled ReLU (a_l/θ_l)·ReLU(I_l). For a plainly converted SNN a_l = θ_l
   and this is exactly the BN-folded teacher (bias correction aside).
2. **Surrogate-gradient inversion.** The SNN itself is inverted through time,
   the Heaviside step given the triangular surrogate of ``privatize``. A
   one-timestep model is attacked in its key-free form
   (``privatize.canonical_form``: biases folded into the thresholds), so the
   surrogate's width — in units of θ — does not depend on a re-keying
   (``privatize.rekey_thresholds``) that leaves every spike as it was.

Each attack's images are scored by an independent *judge*: the fraction it
classifies as the class they were made for (chance: 1/classes). The same
attacks on the plainly converted SNN and attack 1 on the teacher are the
baselines, so the privacy gain is one number per attack. Attack 1 on the same
architecture with random weights gives the *judge floor*: what the judge says
of inversions that carry no class at all (above chance where the judge reads
every texture as the same few classes).

Also: per-layer weight cosine to the converted SNN (``privatize.weight_cosines``),
a data-leakage statement read from the build manifest, and — given member and
non-member sets — membership inference by loss and confidence thresholds,
scored as ROC AUC (0.5: no better than a coin).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .artifacts import Normalize, Progress, SpikingModel, Teacher, no_progress
from .errors import AuditError
from .graph import GraphNetwork

# (network, labels, input_shape, normalize, seed, progress) -> images N×C×H×W in the normalised input space
Inverter = Callable[[nn.Module, torch.Tensor, tuple[int, int, int], "Normalize | None", int, Progress], torch.Tensor]

ATTACKS = ("weights", "surrogate")
EVAL_BATCH = 512


@dataclass(frozen=True)
class AuditConfig:
    """How hard the attacker tries; the defaults take about a minute per model on 2 CPU cores."""

    images_per_class: int = 10  # inverted images per class and attack
    iterations: int = 200  # inversion steps per image (the pipeline's inverter; an image may stop at half once its class has p ≥ 0.99)
    attack_timesteps: int = 4  # T of the surrogate-gradient attack: the model's own T if smaller
    surrogate_width: float = 1.0  # half-width of the triangular surrogate, in units of θ
    seed: int = 0


@dataclass(frozen=True)
class Judge:
    """An independent classifier that scores inverted images."""

    network: nn.Module  # eval-mode classifier: N×C×H×W (its own normalisation) -> N×classes
    normalize: Normalize | None  # the normalisation it expects on [0,1] pixels
    name: str  # for reports: "zoo:fmnist_judge", "teacher", a path


@dataclass(frozen=True)
class MembershipData:
    """Images the teacher was trained on (members) and images it never saw (non-members)."""

    members: torch.Tensor  # N×C×H×W, normalised as the model expects
    member_labels: torch.Tensor  # int64 N
    non_members: torch.Tensor  # M×C×H×W
    non_member_labels: torch.Tensor  # int64 M
    source: str  # where they came from, for reports


@dataclass(frozen=True)
class Inversion:
    """The images one attack produced against one model."""

    model: str  # "deployed", "converted" or "ann"
    attack: str  # "weights" or "surrogate"
    images: torch.Tensor  # N×C×H×W, normalised input space
    labels: torch.Tensor  # int64 N, the class each image was made for


@dataclass(frozen=True)
class AuditResult:
    """What the audit found, and the inverted images behind the class-leakage figures."""

    document: dict[str, Any]  # audit.json: attacks, weight similarity, data leakage, membership
    inversions: list[Inversion] = field(default_factory=list)  # for the PNG grids


# ---------------------------------------------------------------------------
# Attack 1: the deployed weights as an ANN


class ScaledReLU(nn.Module):
    """``scale·ReLU(x)`` with a per-layer or per-channel scale: a spiking neuron seen as an ANN activation."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale
        if scale.dim() == 1 and x.dim() > 2:
            scale = scale.reshape(-1, *([1] * (x.dim() - 2)))
        return torch.relu(x) * scale


def descaled_ann(model: SpikingModel) -> GraphNetwork:
    """The ANN an attacker rebuilds from the deployed SNN: neurons → (a/θ)·ReLU, weights in ANN scale."""
    activations: dict[str, nn.Module] = {}
    for name, theta in model.thresholds.items():
        amplitude = model.amplitude(name)
        activations[name] = nn.ReLU() if amplitude is theta else ScaledReLU(amplitude / theta)
    return GraphNetwork(model.graph, activations).eval()


def untrained_ann(model: SpikingModel, seed: int) -> GraphNetwork:
    """The attacked architecture with random (He-initialised) weights and zero biases: a network that knows no class.

    Attack 1 on it measures the judge's floor: how often the judge names the
    intended class for inversions that carry no class features (a judge may
    read every texture as one or two classes, so the floor can sit above chance).
    """
    graph = model.graph.copy()
    generator = torch.Generator().manual_seed(seed)
    for node in graph.weighted():
        weight = node.params["weight"]
        node.params["weight"] = torch.randn(weight.shape, generator=generator) * math.sqrt(2 / weight[0].numel())
        if node.params.get("bias") is not None:
            node.params["bias"] = torch.zeros_like(node.params["bias"])
    return GraphNetwork(graph).eval()


# ---------------------------------------------------------------------------
# Attack 2: the SNN through surrogate gradients


class SurrogateSNN(nn.Module):
    """The SNN (direct coding, ``timesteps`` steps) as a differentiable classifier x -> logits averaged over T."""

    def __init__(self, model: SpikingModel, timesteps: int, width: float):
        super().__init__()
        from .privatize import TrainingNetwork, canonical_form

        floats = {node.name: "float" for node in model.graph.weighted()}  # the stored weights are already what the device runs
        self.network = TrainingNetwork(canonical_form(model), width, floats)
        self.timesteps = timesteps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x, self.timesteps, len(x))


# ---------------------------------------------------------------------------
# Scoring


def _judge_inputs(images: torch.Tensor, source: Normalize | None, judge: Judge) -> torch.Tensor:
    """Re-normalise images from the audited model's input space to the judge's."""
    if source == judge.normalize or source is None or judge.normalize is None:
        return images
    channels = images.shape[1]

    def column(values) -> torch.Tensor:
        tensor = torch.tensor(values, dtype=torch.float32)
        return tensor.expand(channels).reshape(1, -1, 1, 1) if tensor.numel() == 1 else tensor.reshape(1, -1, 1, 1)

    pixels = images * column(source[1]) + column(source[0])
    return (pixels - column(judge.normalize[0])) / column(judge.normalize[1])


def _logits(network: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([network(images[i : i + EVAL_BATCH]) for i in range(0, len(images), EVAL_BATCH)])


def judge_success(judge: Judge, images: torch.Tensor, labels: torch.Tensor, normalize: Normalize | None) -> tuple[float, list[float]]:
    """Fraction of ``images`` the judge classifies as their label; and the same per class."""
    predictions = _logits(judge.network, _judge_inputs(images, normalize, judge)).argmax(1)
    hits = (predictions == labels).float()
    per_class = [round(float(hits[labels == c].mean()), 4) if bool((labels == c).any()) else float("nan") for c in range(int(labels.max()) + 1)]
    return round(float(hits.mean()), 4), per_class


# ---------------------------------------------------------------------------
# Membership inference


def roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` separating ``positive`` from the rest (Mann–Whitney, ties count ½)."""
    scores = scores.double()
    ranks = torch.empty_like(scores)
    order = scores.argsort()
    sorted_scores = scores[order]
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # average ranks over ties
    unique, inverse, counts = torch.unique(sorted_scores, return_inverse=True, return_counts=True)
    if len(unique) < len(scores):
        sums = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks[order])
        ranks[order] = (sums / counts)[inverse]
    count_positive = int(positive.sum())
    count_negative = len(scores) - count_positive
    if count_positive == 0 or count_negative == 0:
        raise AuditError("membership: both members and non-members are needed for an AUC")
    rank_sum = float(ranks[positive].sum())
    return (rank_sum - count_positive * (count_positive + 1) / 2) / (count_positive * count_negative)


def membership_inference(logits_of: Callable[[torch.Tensor], torch.Tensor], data: MembershipData) -> dict[str, Any]:
    """Loss and confidence threshold attacks: members tend to have lower loss and higher confidence.

    loss attack (Yeom et al., 2018): score = −CE(f(x), y), which needs the label;
    confidence attack (Salem et al., 2019): score = max_k softmax(f(x))_k, which does not.
    A threshold on the score is the attack; its ROC AUC over all thresholds is reported.
    """
    member_logits, non_member_logits = logits_of(data.members), logits_of(data.non_members)
    logits = torch.cat([member_logits, non_member_logits])
    labels = torch.cat([data.member_labels, data.non_member_labels])
    is_member = torch.cat([torch.ones(len(member_logits), dtype=torch.bool), torch.zeros(len(non_member_logits), dtype=torch.bool)])
    loss = F.cross_entropy(logits, labels, reduction="none")
    confidence = logits.softmax(1).amax(1)
    return {
        "loss_auc": round(roc_auc(-loss, is_member), 4),
        "confidence_auc": round(roc_auc(confidence, is_member), 4),
        "member_accuracy": round(float((member_logits.argmax(1) == data.member_labels).float().mean()), 4),
        "non_member_accuracy": round(float((non_member_logits.argmax(1) == data.non_member_labels).float().mean()), 4),
    }


# ---------------------------------------------------------------------------
# Data leakage


def data_leakage(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """What the build manifest says about data sets read while the model was built.

    Every stage's inputs are listed with their sha256; a data-free build reads
    only the model and its own artifacts, and records ``datasets_read_by_build: []``.
    The eval stage (real data, optional) only measures the finished model: nothing downstream reads its output.
    """
    if manifest is None:
        return {"verified": False, "statement": "no build manifest: whether the build read a data set cannot be checked"}
    declared = manifest.get("datasets_read_by_build")
    stages = manifest.get("stages", {}) if isinstance(manifest.get("stages"), dict) else {}
    inputs = {name: sorted((stage.get("inputs") or {}).keys()) for name, stage in stages.items() if isinstance(stage, dict)}
    evaluation_only = {"eval"}
    build_inputs = sorted({item for name, items in inputs.items() if name not in evaluation_only for item in items})
    artifact_like = all(item == "model" or "." in item for item in build_inputs)
    verified = declared == [] and artifact_like
    statement = (
        f"the build read no data set: datasets_read_by_build is empty and the {len(inputs) - len(evaluation_only & set(inputs))} build stages read only {', '.join(build_inputs)}"
        if verified
        else f"the manifest does not show a data-free build (datasets_read_by_build = {declared!r})"
    )
    evaluation = manifest.get("evaluation") if isinstance(manifest.get("evaluation"), dict) else None
    if "eval" in inputs or evaluation is not None:
        source = f" ({evaluation.get('data')})" if evaluation is not None and evaluation.get("data") else ""
        statement += f"; real data{source} was read after the build, by the eval stage only, to measure accuracy"
    return {"verified": verified, "datasets_read_by_build": declared, "stage_inputs": inputs, "evaluation_data": evaluation.get("data") if evaluation else None, "statement": statement}


# ---------------------------------------------------------------------------
# The stage


def _check(config: AuditConfig, model: SpikingModel, membership: MembershipData | None) -> None:
    if config.images_per_class < 1:
        raise AuditError(f"images per class {config.images_per_class} must be at least 1")
    if config.iterations < 2:
        raise AuditError(f"iterations {config.iterations} must be at least 2")
    if config.attack_timesteps < 1:
        raise AuditError(f"attack timesteps {config.attack_timesteps} must be at least 1")
    if membership is not None:
        for what, images, labels in (("members", membership.members, membership.member_labels), ("non-members", membership.non_members, membership.non_member_labels)):
            if len(images) == 0 or len(images) != len(labels):
                raise AuditError(f"membership: {what} set is empty or its labels do not match its images")
            if tuple(images.shape[1:]) != tuple(model.input_shape):
                raise AuditError(f"membership: {what} have shape {tuple(images.shape[1:])} but the model expects {model.input_shape}")


def _class_labels(config: AuditConfig, classes: int) -> torch.Tensor:
    return torch.arange(classes).repeat(config.images_per_class)


def audit(
    model: SpikingModel,
    inverter: Inverter,
    teacher: Teacher | None = None,
    converted: SpikingModel | None = None,
    judge: Judge | None = None,
    membership: MembershipData | None = None,
    manifest: dict[str, Any] | None = None,
    config: AuditConfig = AuditConfig(),
    progress: Progress = no_progress,
) -> AuditResult:
    """Run both class-leakage attacks on ``model`` (and the baselines), weight similarity, data leakage, membership.

    ``converted``: the plainly converted SNN (baseline for both attacks and the
    reference of the weight similarity); ``teacher``: the ANN (baseline of attack 1,
    and the judge when none is given).
    """
    _check(config, model, membership)
    started = time.perf_counter()
    if judge is None:
        if teacher is None:
            raise AuditError("no judge: give a judge model or the teacher (--teacher)")
        judge = Judge(teacher.network, teacher.normalize, "teacher (no independent judge given)")
    classes = model.num_classes
    labels = _class_labels(config, classes)
    targets: list[tuple[str, str, nn.Module]] = []
    for name, snn in (("deployed", model), ("converted", converted)):
        if snn is None:
            continue
        timesteps = min(config.attack_timesteps, snn.timesteps)
        targets.append((name, "weights", descaled_ann(snn)))
        targets.append((name, "surrogate", SurrogateSNN(snn, timesteps, config.surrogate_width)))
    if teacher is not None:
        targets.append(("ann", "weights", teacher.network))
    targets.append(("untrained", "weights", untrained_ann(model, config.seed)))

    attacks: dict[str, dict[str, Any]] = {}
    inversions: list[Inversion] = []
    for index, (name, attack, network) in enumerate(targets):
        attack_started = time.perf_counter()
        images = inverter(network, labels, model.input_shape, model.normalize, config.seed + index, progress)
        success, per_class = judge_success(judge, images, labels, model.normalize)
        own = float((_logits(network, images).argmax(1) == labels).float().mean())
        entry = {
            "attack_success": success,
            "chance": round(1 / classes, 4),
            "per_class": per_class,
            "attacked_model_agreement": round(own, 4),  # the attacked network itself classifies its inversions as intended
            "images": len(images),
            "seconds": round(time.perf_counter() - attack_started, 2),
        }
        if attack == "surrogate":
            entry["timesteps"] = network.timesteps
        attacks.setdefault(attack, {})[name] = entry
        inversions.append(Inversion(name, attack, images, labels))
        progress("audit attacks", index + 1, len(targets))

    floor = attacks["weights"].pop("untrained")["attack_success"]
    gains = {}
    for attack, entries in attacks.items():
        if "deployed" in entries and "converted" in entries:
            gains[attack] = round(entries["converted"]["attack_success"] - entries["deployed"]["attack_success"], 4)

    reference = converted or model
    from .privatize import weight_cosines

    document: dict[str, Any] = {
        "judge": judge.name,
        "classes": classes,
        "chance": round(1 / classes, 4),
        "judge_floor": floor,  # attack 1 on the architecture with random weights: what the judge says of class-free inversions
        "attacks": attacks,
        "privacy_gain": gains,  # attack success on the plain converted SNN minus on the deployed one
        "weight_cosine": weight_cosines(reference.graph, model),  # per layer, vs the converted SNN (= BN-folded ANN weights)
        "weight_cosine_reference": "converted SNN" if converted is not None else "the model itself (no converted SNN given)",
        "data_leakage": data_leakage(manifest),
        "deployed": {
            "timesteps": model.timesteps,
            "binary_layers": [n.name for n in model.graph.weighted() if n.attrs.get("weight_format") == "binary"],
            "mixed_layers": [n.name for n in model.graph.weighted() if n.attrs.get("weight_format") == "mixed"],  # some output channels binary
        },
        "config": asdict(config),
    }
    if membership is not None:
        from .privatize import snn_logits

        document["membership"] = {
            "source": membership.source,
            "members": len(membership.members),
            "non_members": len(membership.non_members),
            "deployed": membership_inference(lambda images: snn_logits(model, images), membership),
        }
        if teacher is not None:
            teacher_network = teacher.network
            document["membership"]["ann"] = membership_inference(lambda images: _logits(teacher_network, images), membership)
    document["seconds"] = round(time.perf_counter() - started, 2)
    return AuditResult(document, inversions)


def summary(document: dict[str, Any]) -> dict[str, Any]:
    """The ``--json`` view: per attack and model, attack_success with the chance level."""
    result: dict[str, Any] = {
        "judge": document["judge"],
        "chance": document["chance"],
        "judge_floor": document.get("judge_floor"),
        "attacks": {attack: {model: {"attack_success": entry["attack_success"], "chance": entry["chance"]} for model, entry in entries.items()} for attack, entries in document["attacks"].items()},
        "privacy_gain": document["privacy_gain"],
        "data_leakage": document["data_leakage"]["statement"],
    }
    if "membership" in document:
        result["membership"] = {k: v for k, v in document["membership"].items() if isinstance(v, dict)}
    return result


def report_markdown(document: dict[str, Any]) -> str:
    """The audit's section of the bundle report."""
    lines = ["## Privacy audit", "", f"Judge: {document['judge']}; chance level {document['chance']:.0%}; judge floor (attack 1 on the architecture with random weights) {document.get('judge_floor', float('nan')):.1%}.", "", "| attack | model | attack success |", "|---|---|---|"]
    for attack, entries in document["attacks"].items():
        for model, entry in entries.items():
            lines.append(f"| {attack} | {model} | {entry['attack_success']:.1%} |")
    if document["privacy_gain"]:
        lines += ["", "Privacy gain (converted − deployed): " + ", ".join(f"{a} {g:+.1%}" for a, g in document["privacy_gain"].items())]
    cosines = document["weight_cosine"]
    if cosines:
        lines += ["", "Weight cosine to the converted SNN per layer: " + ", ".join(f"{k} {v:.3f}" for k, v in cosines.items())]
    lines += ["", f"Data leakage: {document['data_leakage']['statement']}."]
    if "membership" in document:
        m = document["membership"]
        for name in ("deployed", "ann"):
            if name in m:
                lines.append(f"Membership inference ({name}): loss AUC {m[name]['loss_auc']:.3f}, confidence AUC {m[name]['confidence_auc']:.3f}.")
    return "\n".join(lines) + "\n"


__all__ = ["ATTACKS", "AuditConfig", "AuditResult", "Inversion", "Judge", "MembershipData", "ScaledReLU", "SurrogateSNN", "audit", "data_leakage", "descaled_ann", "judge_success", "untrained_ann", "membership_inference", "report_markdown", "roc_auc", "summary"]
