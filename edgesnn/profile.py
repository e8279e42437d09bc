"""Stage ``profile``: operation counts, memory, energy and latency of the ANN and the SNN.

Accounting comes from real runs (synthetic images in a build, real ones with
``--data``):

- ANN: a conv/linear layer costs MACs = outputs × fan-in (C_in/groups·k_h·k_w,
  or in_features), whatever its input's sparsity (a dense accelerator does
  not skip zeros); BatchNorm is folded first, as any deployment would.
- SNN: a layer fed by spikes costs synaptic accumulates (ACs) = Σ over steps
  and output positions of the number of non-zero inputs in the receptive
  field, times the output channels per group: measured exactly on the run,
  padding included. A layer fed by the image (direct coding) multiplies:
  its input is constant in time, so its MACs are counted once per inference.
  Average pooling of spikes feeds small integer counts; each non-zero count is
  one accumulate (a shift-and-add of a few bit planes).
- spike rate of a neuron layer = spikes / (neurons · T · images).
- memory: weight bits per format (fp32 32, int8 8 plus an fp32 scale per output
  channel, binary 1 plus an fp32 α per output channel, biases fp32); the
  activation bytes of every tensor (fp32 4 bytes in the ANN; spikes 1 bit,
  pooled spikes ⌈log2(window+1)⌉ bits, accumulators 4 bytes in the SNN; a
  conv whose only consumer is its neuron is fused and never stored); the
  membrane state (4 bytes per neuron, only for T > 1: at T = 1 a neuron starts
  from the constant v(0) every inference); the peak arena from tensor
  lifetimes in topological order.

Energy and latency multiply these counts by per-op figures of a *target*: a
TOML file of constants, each with its source. Built-in targets: ``asic45nm``
(Horowitz ISSCC 2014), ``cortex_m4`` (cycles per op, clock, energy per cycle)
and ``crossbar`` (an ISAAC-like memristive accelerator). ``energy_ratio`` =
ANN energy / SNN energy, compute and memory traffic together.
"""

from __future__ import annotations

import math
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .artifacts import Progress, SpikingModel, Teacher, no_progress
from .errors import EdgeSNNError
from .graph import Graph, GraphNetwork, Node, fold_batchnorm
from .privatize import binary_rows, binary_weight_count

TARGET_DIR = Path(__file__).parent / "targets"
# Built-in targets: name -> TOML file shipped with edgesnn.
TARGETS: dict[str, str] = {
    "asic45nm": "asic45nm.toml",
    "cortex_m4": "cortex_m4.toml",
    "crossbar": "crossbar.toml",
}
# Every digital target prices each of these operation classes.
OP_CLASSES = (
    "fp32_mac",  # 32-bit float multiply-accumulate
    "fp32_ac",  # a spike adds its fp32 weight
    "fp32_add",  # elementwise fp32 add / compare (residual, pooling, bias, ReLU)
    "fp32_neuron",  # one IF neuron step in fp32: membrane add + compare
    "int8_mac",  # int8 × int8 (or int16) into a 32-bit accumulator
    "int8_ac",  # a spike adds its int8 weight
    "binary_mac",  # a 1-bit weight adds or subtracts a multi-bit input
    "binary_ac",  # a spike meets a 1-bit weight (AND + popcount)
    "int32_add",  # elementwise integer add / compare
    "int32_neuron",  # one IF neuron step in integers
    "memory_byte",  # one byte read or written on chip
)
_CHANNELWISE_VIEWS = ("reshape", "identity")
_POOLS = ("avgpool", "adaptive_avgpool", "global_mean")
EVAL_SAMPLES = 4096  # T·B samples per simulation call


class ProfileError(EdgeSNNError):
    """A hardware profile was asked for something impossible, or a target file is malformed."""

    stage = "profile"


# ---------------------------------------------------------------------------
# Targets


@dataclass(frozen=True)
class Constant:
    """One number a target uses, with where it comes from."""

    value: float  # the figure
    unit: str  # pJ, cycles, MHz, ...
    source: str  # citation or "assumed: ..."


@dataclass(frozen=True)
class Target:
    """Per-op energies and timing of one kind of hardware."""

    name: str  # "asic45nm", or the name given in a user's file
    kind: str  # "digital" (ops × figures) or "crossbar" (arrays, ADCs, DACs)
    description: str  # one line for reports
    constants: dict[str, Constant]  # every figure used, by name ("fp32_mac.pj", "clock_mhz", ...)
    origin: str  # the file it was read from

    def value(self, name: str) -> float:
        return self.constants[name].value


def load_target(spec: str | Path) -> Target:
    """A built-in target by name, or a user's TOML file (same layout as ``edgesnn/targets/*.toml``)."""
    spec_text = str(spec)
    if spec_text in TARGETS:
        path = TARGET_DIR / TARGETS[spec_text]
    else:
        path = Path(spec_text)
        if not path.is_file():
            raise ProfileError(f"target {spec_text!r} is neither a built-in target ({', '.join(TARGETS)}) nor a TOML file")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise ProfileError(f"{path}: cannot read target file ({error})") from None
    except tomllib.TOMLDecodeError as error:
        raise ProfileError(f"{path}: not valid TOML ({error})") from None
    return _parse_target(data, str(path))


def _constant(data: dict, key: str, unit: str, where: str, field_name: str = "value") -> Constant:
    entry = data.get(key)
    if not isinstance(entry, dict) or field_name not in entry:
        raise ProfileError(f"{where}: {key!r} must be a table with {field_name!r} and 'source', e.g. {key} = {{ {field_name} = 1.0, source = \"...\" }}")
    value = entry[field_name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ProfileError(f"{where}: {key}.{field_name} = {value!r}; expected a finite number ≥ 0")
    source = entry.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ProfileError(f"{where}: {key} has no 'source': every constant must say where it comes from")
    return Constant(float(value), unit, source)


def _parse_target(data: dict, where: str) -> Target:
    kind = data.get("kind")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ProfileError(f"{where}: missing 'name'")
    constants: dict[str, Constant] = {}
    if kind == "digital":
        constants["clock_mhz"] = _constant(data, "clock_mhz", "MHz", where)
        constants["parallel_ops"] = _constant(data, "parallel_ops", "ops/cycle", where)
        if constants["clock_mhz"].value <= 0 or constants["parallel_ops"].value <= 0:
            raise ProfileError(f"{where}: clock_mhz and parallel_ops must be > 0")
        per_cycle = _constant(data, "energy_per_cycle_pj", "pJ/cycle", where) if "energy_per_cycle_pj" in data else None
        if per_cycle is not None:
            constants["energy_per_cycle_pj"] = per_cycle
        ops = data.get("ops")
        if not isinstance(ops, dict):
            raise ProfileError(f"{where}: missing the [ops] table ({', '.join(OP_CLASSES)})")
        missing = [op for op in OP_CLASSES if op not in ops]
        if missing:
            raise ProfileError(f"{where}: [ops] lacks {', '.join(missing)}; a digital target prices every one of {', '.join(OP_CLASSES)}")
        for op in OP_CLASSES:
            entry = ops[op]
            if not isinstance(entry, dict) or "cycles" not in entry or ("pj" not in entry and per_cycle is None):
                raise ProfileError(f"{where}: ops.{op} needs 'cycles' and 'pj' (or a target-wide energy_per_cycle_pj)")
            constants[f"{op}.cycles"] = _constant(ops, op, "cycles", where, "cycles")
            if "pj" in entry:
                constants[f"{op}.pj"] = _constant(ops, op, "pJ", where, "pj")
            else:
                cycles = constants[f"{op}.cycles"]
                constants[f"{op}.pj"] = Constant(cycles.value * per_cycle.value, "pJ", f"{cycles.value:g} cycles × energy_per_cycle_pj")
    elif kind == "crossbar":
        units = {
            "tile_size": "rows",
            "read_cycle_ns": "ns",
            "array_read_pj": "pJ",
            "adc_pj": "pJ",
            "adc_bits": "bits",
            "dac_pj": "pJ",
            "shift_add_pj": "pJ",
            "neuron_pj": "pJ",
            "memory_byte_pj": "pJ",
            "ann_input_bits": "bits",
        }
        for key, unit in units.items():
            constants[key] = _constant(data, key, unit, where)
        if constants["tile_size"].value < 2 or constants["ann_input_bits"].value < 1 or constants["adc_bits"].value < 1:
            raise ProfileError(f"{where}: tile_size must be ≥ 2, adc_bits and ann_input_bits ≥ 1")
    else:
        raise ProfileError(f"{where}: kind {kind!r} is unknown; valid: digital, crossbar")
    return Target(name, kind, str(data.get("description", name)), constants, where)


# ---------------------------------------------------------------------------
# Static structure: fan-in, outputs, formats, tensor sizes


def weight_format(node: Node) -> str:
    return node.attrs.get("weight_format", "float")


def fan_in(node: Node) -> int:
    """Inputs summed by one output of a conv/linear: C_in/groups · k_h · k_w, or in_features."""
    weight = node.params["weight"]
    return int(math.prod(weight.shape[1:]))


def output_positions(node: Node) -> int:
    """Spatial positions of a conv's output (1 for a linear layer)."""
    return int(math.prod(node.shape[1:])) if node.op == "conv" else 1


def dense_macs(node: Node) -> int:
    """MACs of one conv/linear evaluation: outputs × fan-in."""
    return int(math.prod(node.shape)) * fan_in(node)


def binary_weight_share(node: Node) -> float:
    """Share of a conv/linear's weights that are 1-bit: 1 binary, 0 int8 or float, a mixed layer's binary channels."""
    return len(binary_rows(node)) / node.params["weight"].shape[0]


def weight_bits(node: Node) -> float:
    """Bits per weight; a mixed layer's mean over its binary (1) and int8 (8) output channels."""
    if weight_format(node) == "mixed":
        share = binary_weight_share(node)
        return round(share + 8 * (1 - share), 4)
    return {"binary": 1, "int8": 8}.get(weight_format(node), 32)


def layer_weight_bytes(node: Node, weight_format_name: str | None = None) -> int:
    """Bytes of a conv/linear's parameters in a format: packed weights (a mixed layer: its binary channels
    packed, the others a byte a weight), per-channel scales, fp32 bias."""
    kind = weight_format_name or weight_format(node)
    weight = node.params["weight"]
    channels = weight.shape[0]
    bias = 4 * node.params["bias"].numel() if "bias" in node.params else 0
    if kind == "binary":
        return -(-weight.numel() // 8) + 4 * channels + bias
    if kind == "mixed":
        binary = binary_weight_count(node)
        return -(-binary // 8) + weight.numel() - binary + 4 * channels + bias
    if kind == "int8":
        return weight.numel() + 4 * channels + bias
    return 4 * weight.numel() + bias


def _alias_root(graph: Graph, name: str) -> str:
    node = graph[name]
    while node.op in _CHANNELWISE_VIEWS:
        node = graph[node.inputs[0]]
    return node.name


def input_kind(graph: Graph, node: Node) -> tuple[str, int]:
    """What feeds a layer: ("analog", 0) for the image or other currents, ("spikes", 1) for spike
    maps, ("pooled", bits) for average-pooled spikes (small counts of ``bits`` bit planes)."""
    current = graph[node.inputs[0]]
    window = 1
    while True:
        if current.op == "relu":
            return ("spikes", 1) if window == 1 else ("pooled", max(1, window.bit_length()))
        if current.op in ("reshape", "identity", "pad", "slice", "maxpool"):
            current = graph[current.inputs[0]]
        elif current.op == "cat":
            kinds = [input_kind(graph, Node("probe", "identity", (name,))) for name in current.inputs]
            if all(kind == "spikes" for kind, _ in kinds):
                return ("spikes", 1) if window == 1 else ("pooled", max(1, window.bit_length()))
            return ("analog", 0)
        elif current.op in _POOLS:
            source = graph[current.inputs[0]]
            window *= _pool_window(current, source)
            current = source
        else:
            return ("analog", 0)


def _pool_window(node: Node, source: Node) -> int:
    if node.op == "avgpool":
        kernel = node.attrs["kernel"]
        return int(math.prod(kernel)) if isinstance(kernel, (tuple, list)) else int(kernel) ** 2
    if node.op == "global_mean":
        return int(math.prod(source.shape[1:]))
    return max(1, int(math.prod(source.shape[1:]) // max(1, math.prod(node.shape[1:]))))  # adaptive average


def elementwise_ops(graph: Graph, spiking: bool) -> int:
    """Adds and compares per evaluation outside conv/linear MACs: biases, residual adds, pooling
    sums and maxima, and (ANN) ReLU compares. Neuron updates of the SNN are counted apart."""
    total = 0
    for node in graph.nodes:
        numel = int(math.prod(node.shape)) if node.shape else 0
        if node.op in ("conv", "linear") and "bias" in node.params:
            total += numel
        elif node.op == "add":
            total += numel * (len(node.inputs) - 1)
        elif node.op in _POOLS:
            total += int(math.prod(graph[node.inputs[0]].shape))
        elif node.op == "maxpool":
            kernel = node.attrs["kernel"]
            total += numel * max(0, (int(math.prod(kernel)) if isinstance(kernel, (tuple, list)) else int(kernel) ** 2) - 1)
        elif node.op == "relu" and not spiking:
            total += numel
        elif node.op == "batchnorm":
            total += 2 * numel
    return total


def _tensor_bytes(graph: Graph, node: Node, spiking: bool, integer: bool) -> float:
    """Bytes one sample of a node's output occupies (0 for a view or a fused accumulator)."""
    numel = int(math.prod(node.shape)) if node.shape else 0
    consumers = graph.consumers(node.name)
    if node.op in _CHANNELWISE_VIEWS:
        return 0
    if node.op == "input":
        return numel * (1 if spiking and integer else 4)  # uint8 pixels in an integer deployment
    if not spiking:
        if node.op == "relu" and len(graph.consumers(node.inputs[0])) == 1:
            return 0  # ReLU in place
        return 4 * numel
    if node.op in ("conv", "linear", "add") and consumers and all(c.op == "relu" for c in consumers) and len(consumers) == 1:
        return 0  # fused with its neuron: the accumulator never reaches memory
    if node.op == "relu":
        return numel / 8
    if node.op in ("avgpool", "adaptive_avgpool", "global_mean", "maxpool", "pad", "slice", "cat"):
        probe = Node("probe", "linear", (node.name,))
        kind, bits = input_kind(graph, probe)
        if kind != "analog":
            return numel * bits / 8
    return 4 * numel


def memory_layout(graph: Graph, spiking: bool, integer: bool) -> dict[str, Any]:
    """Activation bytes per sample: every stored tensor, the traffic (each written once and read by
    each consumer), and the peak of the tensors alive at once (topological order, freed after last use)."""
    sizes = {node.name: _tensor_bytes(graph, node, spiking, integer) for node in graph.nodes}
    last_use: dict[str, int] = {}
    for index, node in enumerate(graph.nodes):
        for name in node.inputs:
            last_use[_alias_root(graph, name)] = index
    live: dict[str, float] = {}
    peak = 0.0
    for index, node in enumerate(graph.nodes):
        if sizes[node.name]:
            live[node.name] = sizes[node.name]
        peak = max(peak, sum(live.values()))
        for name in [n for n in live if last_use.get(n, -1) == index and n != graph.output]:
            del live[name]
    reads = {node.name: 0 for node in graph.nodes}
    for node in graph.nodes:
        for name in node.inputs:
            reads[_alias_root(graph, name)] += 1
    traffic = sum(size * (1 + reads[name]) for name, size in sizes.items())
    return {"activation_bytes": math.ceil(sum(sizes.values())), "traffic_bytes": math.ceil(traffic), "peak_bytes": math.ceil(peak)}


# ---------------------------------------------------------------------------
# Measured runs


def _events(node: Node, x: torch.Tensor) -> float:
    """Synaptic events of one layer call: Σ over output positions of the non-zero inputs in the
    receptive field, times the output channels per group."""
    indicator = (x != 0).to(torch.float32)
    out_channels = node.params["weight"].shape[0]
    if node.op == "linear":
        return float(indicator.sum()) * out_channels
    a = node.attrs
    groups = a.get("groups", 1)
    kernel = node.params["weight"].shape[2:]
    grouped = indicator.reshape(indicator.shape[0], groups, -1, *indicator.shape[2:]).sum(2)
    fan = F.conv2d(grouped, torch.ones(groups, 1, *kernel), None, a["stride"], a["padding"], a["dilation"], groups)
    return float(fan.sum()) * (out_channels // groups)


def _measure(network: torch.nn.Module, graph: Graph, run, images: torch.Tensor, batch: int, progress: Progress, task: str) -> dict[str, dict[str, float]]:
    """Forward hooks on every conv/linear (inputs: non-zero share, events) and neuron (outputs:
    non-zero share) while ``run(chunk)`` executes on all images."""
    stats: dict[str, dict[str, float]] = {}
    handles = []

    def weighted_hook(node: Node):
        def hook(module, inputs, output):
            x = inputs[0]
            entry = stats.setdefault(node.name, {"nonzero": 0.0, "elements": 0.0, "events": 0.0, "samples": 0.0})
            entry["nonzero"] += float((x != 0).sum())
            entry["elements"] += x.numel()
            entry["events"] += _events(node, x)
            entry["samples"] += x.shape[0]

        return hook

    def neuron_hook(node: Node):
        def hook(module, inputs, output):
            entry = stats.setdefault(node.name, {"nonzero": 0.0, "elements": 0.0})
            entry["nonzero"] += float((output != 0).sum())
            entry["elements"] += output.numel()

        return hook

    for node in graph.weighted():
        handles.append(network.layer(node.name).register_forward_hook(weighted_hook(node)))
    for node in graph.neurons():
        handles.append(network.layer(node.name).register_forward_hook(neuron_hook(node)))
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch):
                run(images[start : start + batch])
                progress(task, min(start + batch, len(images)), len(images))
    finally:
        for handle in handles:
            handle.remove()
    return stats


def count_ann(graph: Graph, images: torch.Tensor, progress: Progress = no_progress) -> dict[str, Any]:
    """Per-layer MACs, activation density and memory of an ANN graph (BatchNorm folded first)."""
    graph = fold_batchnorm(graph)
    network = GraphNetwork(graph).eval()
    stats = _measure(network, graph, network, images, 500, progress, "profile ANN") if len(images) else {}
    layers = []
    for node in graph.weighted():
        entry = stats.get(node.name, {})
        layers.append(
            {
                "name": node.name,
                "op": node.op,
                "weights": node.params["weight"].numel(),
                "weight_bits": 32,
                "weight_bytes": layer_weight_bytes(node, "float"),
                "fan_in": fan_in(node),
                "outputs": int(math.prod(node.shape)),
                "macs": dense_macs(node),
                "input_density": round(entry["nonzero"] / entry["elements"], 6) if entry.get("elements") else None,
            }
        )
    activations = {node.name: round(stats[node.name]["nonzero"] / stats[node.name]["elements"], 6) for node in graph.neurons() if node.name in stats}
    macs = sum(layer["macs"] for layer in layers)
    return {
        "layers": layers,
        "macs": macs,
        "elementwise_ops": elementwise_ops(graph, spiking=False),
        "weights": sum(layer["weights"] for layer in layers),
        "weight_bytes": sum(layer["weight_bytes"] for layer in layers),
        "weight_bytes_int8": sum(layer_weight_bytes(node, "int8") for node in graph.weighted()),
        "activation_density": activations,
        "memory": memory_layout(graph, spiking=False, integer=False),
        "memory_int8": {k: math.ceil(v / 4) for k, v in memory_layout(graph, spiking=False, integer=False).items()},
    }


def integer_model(model: SpikingModel) -> bool:
    """True when every conv/linear is int8, binary or mixed: the SNN then runs in integers."""
    return all(weight_format(node) in ("int8", "binary", "mixed") for node in model.graph.weighted())


def count_snn(model: SpikingModel, images: torch.Tensor, timesteps: int | None = None, progress: Progress = no_progress) -> dict[str, Any]:
    """Per-layer synaptic events (measured), MACs of analog-input layers, spike rates and memory at T steps."""
    from .convert import SpikingNetwork

    steps = timesteps or model.timesteps
    if steps < 1:
        raise ProfileError(f"timesteps {steps} must be ≥ 1")
    simulator = SpikingNetwork(model)
    batch = max(1, min(500, EVAL_SAMPLES // steps))
    stats = _measure(simulator.network, model.graph, lambda chunk: simulator(chunk, steps), images, batch, progress, "profile SNN") if len(images) else {}
    count = max(1, len(images))
    graph = model.graph
    layers = []
    for node in graph.weighted():
        kind, bits = input_kind(graph, node)
        entry = stats.get(node.name, {})
        steps_seen = entry["samples"] / count if entry.get("samples") else 1
        layer = {
            "name": node.name,
            "op": node.op,
            "weight_format": weight_format(node),
            "weights": node.params["weight"].numel(),
            "weight_bits": weight_bits(node),
            "binary_share": binary_weight_share(node),
            "weight_bytes": layer_weight_bytes(node),
            "fan_in": fan_in(node),
            "outputs": int(math.prod(node.shape)),
            "input": kind,
            "input_bits": bits,
            "input_density": round(entry["nonzero"] / entry["elements"], 6) if entry.get("elements") else None,
            "evaluations": steps_seen,  # layer calls per inference: 1 for a constant input, else T
        }
        if kind == "analog":
            layer["macs"] = dense_macs(node) * int(round(steps_seen))
            layer["acs"] = 0.0
        else:
            layer["macs"] = 0
            layer["acs"] = entry.get("events", 0.0) / count
        layers.append(layer)
    neurons = []
    for node in graph.neurons():
        entry = stats.get(node.name, {})
        rate = entry["nonzero"] / entry["elements"] if entry.get("elements") else 0.0
        size = int(math.prod(node.shape))
        neurons.append({"name": node.name, "neurons": size, "spike_rate": round(rate, 6), "spikes": round(rate * size * steps, 3)})
    integer = integer_model(model)
    memory = memory_layout(graph, spiking=True, integer=integer)
    neuron_count = sum(n["neurons"] for n in neurons)
    state = 4 * (neuron_count + model.num_classes) if steps > 1 else 0
    memory["state_bytes"] = state
    memory["peak_bytes"] += state
    weight_total = sum(layer["weight_bytes"] for layer in layers)
    return {
        "timesteps": steps,
        "integer": integer,
        "layers": layers,
        "neuron_layers": neurons,
        "macs": sum(layer["macs"] for layer in layers),
        "acs": sum(layer["acs"] for layer in layers),
        "spikes": round(sum(n["spikes"] for n in neurons), 3),
        "neurons": neuron_count,
        "spike_rate": round(sum(n["spikes"] for n in neurons) / max(1, neuron_count * steps), 6),
        "neuron_updates": neuron_count * steps,
        "elementwise_ops": elementwise_ops(graph, spiking=True) * steps,
        "output_accumulates": model.num_classes * steps,
        "weights": sum(layer["weights"] for layer in layers),
        "weight_bytes": weight_total + 4 * sum(t.numel() for t in model.thresholds.values()),
        "memory": memory,
    }


# ---------------------------------------------------------------------------
# Energy and latency


def _mac_class(weight_format_name: str) -> str:
    return {"binary": "binary_mac", "int8": "int8_mac"}.get(weight_format_name, "fp32_mac")


def _ac_class(weight_format_name: str) -> str:
    return {"binary": "binary_ac", "int8": "int8_ac"}.get(weight_format_name, "fp32_ac")


def ann_op_counts(ann: dict[str, Any], precision: str = "fp32") -> dict[str, float]:
    """Operations per inference of the ANN in fp32 or int8."""
    memory = ann["memory"] if precision == "fp32" else ann["memory_int8"]
    weights = ann["weight_bytes"] if precision == "fp32" else ann["weight_bytes_int8"]
    counts = dict.fromkeys(OP_CLASSES, 0.0)
    counts["fp32_mac" if precision == "fp32" else "int8_mac"] = float(ann["macs"])
    counts["fp32_add" if precision == "fp32" else "int32_add"] = float(ann["elementwise_ops"])
    counts["memory_byte"] = float(weights + memory["traffic_bytes"])
    return counts


def snn_op_counts(snn: dict[str, Any]) -> dict[str, float]:
    """Operations per inference of the SNN: MACs of analog-input layers, ACs, neuron steps, adds and
    memory traffic (weights read every step, activations written and read, state read and written)."""
    counts = dict.fromkeys(OP_CLASSES, 0.0)
    for layer in snn["layers"]:
        if layer["weight_format"] == "mixed":  # each output channel's share of the MACs and ACs, at its own width
            share = layer["binary_share"]
            counts["binary_mac"] += share * layer["macs"]
            counts["int8_mac"] += (1 - share) * layer["macs"]
            counts["binary_ac"] += share * layer["acs"]
            counts["int8_ac"] += (1 - share) * layer["acs"]
            continue
        counts[_mac_class(layer["weight_format"])] += layer["macs"]
        counts[_ac_class(layer["weight_format"])] += layer["acs"]
    integer = snn["integer"]
    counts["int32_neuron" if integer else "fp32_neuron"] += snn["neuron_updates"]
    counts["int32_add" if integer else "fp32_add"] += snn["elementwise_ops"] + snn["output_accumulates"]
    steps = snn["timesteps"]
    memory = snn["memory"]
    counts["memory_byte"] = float(snn["weight_bytes"] * steps + memory["traffic_bytes"] * steps + 2 * memory["state_bytes"] * steps)
    return counts


def digital_cost(target: Target, counts: dict[str, float]) -> dict[str, Any]:
    """Energy (µJ) and latency (ms) of op counts on a digital target."""
    energy = {op: counts[op] * target.value(f"{op}.pj") for op in OP_CLASSES}
    cycles = sum(counts[op] * target.value(f"{op}.cycles") for op in OP_CLASSES) / target.value("parallel_ops")
    compute = sum(value for op, value in energy.items() if op != "memory_byte")
    return {
        "energy_uj": (compute + energy["memory_byte"]) * 1e-6,
        "compute_energy_uj": compute * 1e-6,
        "memory_energy_uj": energy["memory_byte"] * 1e-6,
        "latency_ms": cycles / (target.value("clock_mhz") * 1e3),
        "breakdown_uj": {op: value * 1e-6 for op, value in energy.items() if value},
    }


def crossbar_layer_tiles(node: Node, tile_size: int) -> dict[str, int]:
    """Kernel-aligned mapping of one conv/linear onto tile_size × tile_size arrays: whole k_h·k_w
    kernels per row block (⌊S/(k_h·k_w)⌋ input channels per tile), two columns per output channel."""
    weight = node.params["weight"]
    kernel = int(math.prod(weight.shape[2:])) if weight.dim() > 2 else 1
    channels = weight.shape[1]
    if kernel > tile_size:
        raise ProfileError(f"node {node.name!r}: a {kernel}-element kernel does not fit a {tile_size}-row tile")
    per_tile = tile_size // kernel
    row_tiles = -(-channels // per_tile)
    column_tiles = -(-2 * weight.shape[0] // tile_size)
    used = weight.numel() * 2
    return {
        "channels_per_tile": per_tile,
        "row_tiles": row_tiles,
        "column_tiles": column_tiles,
        "tiles": row_tiles * column_tiles,
        "cells": used,
        "utilisation": round(used / (row_tiles * column_tiles * tile_size * tile_size), 4),
    }


def crossbar_cost(target: Target, layers: list[dict[str, Any]], graph: Graph, spiking: bool, timesteps: int, neuron_updates: float, traffic_bytes: float) -> dict[str, Any]:
    """Energy and latency on a crossbar accelerator.

    Per layer and read cycle: the driven rows draw array energy in proportion
    (array_read_pj × tiles × share of rows driven), each column pair is
    digitised once (adc_pj per conversion per row-tile) and shift-added, each
    driven row costs a 1-bit DAC pulse. Inputs are streamed bit-serially: the
    ANN's activations take ann_input_bits cycles, spikes one, pooled spikes
    their bit planes, the image 8. Tiles of a layer work in parallel, output
    positions and layers one after another.
    """
    size = int(target.value("tile_size"))
    adc = target.value("adc_pj")
    total_energy = 0.0
    total_ns = 0.0
    mapped = []
    for layer in layers:
        node = graph[layer["name"]]
        tiles = crossbar_layer_tiles(node, size)
        if spiking:
            kind, bits = layer["input"], layer["input_bits"]
            cycles = 8 if kind == "analog" else bits
            evaluations = layer["evaluations"]
        else:
            cycles = 8 if node is graph.weighted()[0] else int(target.value("ann_input_bits"))
            evaluations = 1
        density = layer["input_density"] if layer["input_density"] is not None else 1.0
        reads = output_positions(node) * cycles * evaluations
        rows = tiles["row_tiles"] * min(size, tiles["channels_per_tile"] * (fan_in(node) // node.params["weight"].shape[1]))
        array = reads * tiles["tiles"] * target.value("array_read_pj") * density
        conversions = reads * tiles["row_tiles"] * node.params["weight"].shape[0]
        energy = array + conversions * (adc + target.value("shift_add_pj")) + reads * rows * density * target.value("dac_pj")
        total_energy += energy
        total_ns += reads * target.value("read_cycle_ns")
        mapped.append({"name": layer["name"], **tiles, "reads": reads, "energy_uj": energy * 1e-6})
    periphery = neuron_updates * target.value("neuron_pj") + traffic_bytes * target.value("memory_byte_pj")
    total_energy += periphery
    return {
        "energy_uj": total_energy * 1e-6,
        "compute_energy_uj": (total_energy - traffic_bytes * target.value("memory_byte_pj")) * 1e-6,
        "memory_energy_uj": traffic_bytes * target.value("memory_byte_pj") * 1e-6,
        "latency_ms": total_ns * 1e-6,
        "tiles": sum(m["tiles"] for m in mapped),
        "layers": mapped,
    }


def price(target: Target, ann: dict[str, Any], snn: dict[str, Any], graph_ann: Graph, graph_snn: Graph) -> dict[str, Any]:
    """ANN (fp32 and int8) and SNN energy and latency on one target, and their ratios."""
    if target.kind == "digital":
        ann_cost = digital_cost(target, ann_op_counts(ann, "fp32"))
        ann_int8 = digital_cost(target, ann_op_counts(ann, "int8"))
        snn_cost = digital_cost(target, snn_op_counts(snn))
    else:
        ann_traffic = ann["memory_int8"]["traffic_bytes"]
        neurons_ann = sum(int(math.prod(n.shape)) for n in graph_ann.neurons())
        ann_cost = crossbar_cost(target, ann["layers"], graph_ann, False, 1, neurons_ann, ann_traffic)
        ann_int8 = ann_cost  # a crossbar ANN runs with int8 activations already
        steps = snn["timesteps"]
        snn_traffic = snn["memory"]["traffic_bytes"] * steps + 2 * snn["memory"]["state_bytes"] * steps
        snn_cost = crossbar_cost(target, snn["layers"], graph_snn, True, steps, snn["neuron_updates"], snn_traffic)
    return {
        "target": target.name,
        "kind": target.kind,
        "description": target.description,
        "ann_energy_uj": ann_cost["energy_uj"],
        "ann_int8_energy_uj": ann_int8["energy_uj"],
        "snn_energy_uj": snn_cost["energy_uj"],
        "energy_ratio": ann_cost["energy_uj"] / max(snn_cost["energy_uj"], 1e-30),
        "energy_ratio_int8": ann_int8["energy_uj"] / max(snn_cost["energy_uj"], 1e-30),
        "compute_energy_ratio": ann_cost["compute_energy_uj"] / max(snn_cost["compute_energy_uj"], 1e-30),
        "ann_latency_ms": ann_cost["latency_ms"],
        "ann_int8_latency_ms": ann_int8["latency_ms"],
        "snn_latency_ms": snn_cost["latency_ms"],
        "ann": ann_cost,
        "ann_int8": ann_int8,
        "snn": snn_cost,
    }


ASSUMPTIONS = (
    "Counts are per inference (one image), averaged over the images profiled.",
    "ANN: dense MACs (zeros are not skipped), BatchNorm folded; its fp32 figures use fp32 weights and activations, the int8 figures int8 weights and activations with 32-bit accumulators.",
    "SNN: a layer fed by spikes costs one accumulate per non-zero input per output it reaches (measured, padding included); the image layer multiplies once per inference (direct coding: its input is constant in time).",
    "SNN arithmetic follows the weight format of each layer (fp32, int8, 1-bit); neurons and elementwise ops run in int32 when every layer is int8/1-bit, else in fp32.",
    "Memory traffic: ANN weights read once per inference; SNN weights read once per timestep; every stored activation written once and read by each consumer (per timestep in the SNN); membranes (T > 1 only) read and written every timestep. A conv feeding only its neuron is fused and not stored.",
    "energy_ratio = ANN (fp32) energy / SNN energy, compute and memory together; compute_energy_ratio leaves memory out; energy_ratio_int8 compares with the int8 ANN.",
    "Digital latency = Σ ops × cycles / (parallel ops × clock); memory overlaps compute unless the target gives load cycles. Crossbar latency: output positions × input bit cycles × read cycle per layer, tiles of a layer in parallel, layers in sequence.",
)


@dataclass(frozen=True)
class ProfileConfig:
    """What the profile measures and simulates."""

    targets: tuple[str, ...] = tuple(TARGETS)  # built-in names or TOML paths
    timesteps: int | None = None  # T of the SNN run; None: the model's own
    crossbar: Any = None  # edgesnn.crossbar.CrossbarConfig for the Monte Carlo; None: no simulation
    sweeps: Any = None  # edgesnn.crossbar.SweepConfig; None: no sweeps
    compare_timesteps: tuple[int, ...] = ()  # extra T values simulated under the same noise (T=1 vs T>1)
    compare_variation: bool = True  # also sweep the variation at each compared T (plot crossbar_timesteps.png)
    images: int = 0  # images profiled; 0: all given


@dataclass(frozen=True)
class HardwareProfile:
    """The profile of one model: counts, per-target energy and latency, crossbar robustness."""

    document: dict[str, Any]  # everything, as plain JSON values (profile.json)
    plots: dict[str, bytes] = field(default_factory=dict)  # PNG file name -> bytes


def profile(model: SpikingModel, teacher: Teacher, images: torch.Tensor, labels: torch.Tensor | None, config: ProfileConfig = ProfileConfig(), source: str = "", progress: Progress = no_progress) -> HardwareProfile:
    """Counts on ``images``, energy and latency per target, and (when configured) crossbar Monte Carlo."""
    started = time.perf_counter()
    if config.images:
        images = images[: config.images]
        labels = None if labels is None else labels[: config.images]
    if len(images) == 0:
        raise ProfileError("no images to profile on")
    if tuple(images.shape[1:]) != tuple(model.input_shape):
        raise ProfileError(f"images have shape {tuple(images.shape[1:])} but the model expects {tuple(model.input_shape)}")
    targets = [load_target(spec) for spec in config.targets]
    ann = count_ann(teacher.graph, images, progress)
    snn = count_snn(model, images, config.timesteps, progress)
    folded = fold_batchnorm(teacher.graph)
    priced = {target.name: price(target, ann, snn, folded, model.graph) for target in targets}
    document: dict[str, Any] = {
        "model": {"timesteps": snn["timesteps"], "trained_timesteps": model.timesteps, "input_shape": list(model.input_shape), "num_classes": model.num_classes},
        "images": len(images),
        "data": source,
        "ann": ann,
        "snn": snn,
        "targets": priced,
        "energy_ratio": {name: entry["energy_ratio"] for name, entry in priced.items()},
        "latency_ms": {name: {"ann": entry["ann_latency_ms"], "snn": entry["snn_latency_ms"]} for name, entry in priced.items()},
        "constants": {t.name: {key: {"value": c.value, "unit": c.unit, "source": c.source} for key, c in t.constants.items()} for t in targets},
        "target_files": {t.name: t.origin for t in targets},
        "assumptions": list(ASSUMPTIONS),
    }
    plots: dict[str, bytes] = {}
    if config.crossbar is not None:
        from . import crossbar

        simulation = crossbar.robustness(model, images, labels, config.crossbar, config.sweeps, config.compare_timesteps, progress, config.compare_variation)
        document["crossbar"] = simulation.document
        plots.update(simulation.plots)
    document["seconds"] = round(time.perf_counter() - started, 3)
    return HardwareProfile(document, plots)


def _energy(value: float) -> str:
    return f"{value:.4g} µJ" if value >= 0.1 else f"{value * 1e3:.4g} nJ"


def report_markdown(document: dict[str, Any], title: str = "Hardware profile") -> str:
    """The profile as Markdown: summary per target, layers, memory, crossbar results with their
    plots (PNG files beside the report), every constant with its source, and the assumptions."""
    snn, ann = document["snn"], document["ann"]
    lines = [f"# {title}", ""]
    lines.append(f"Measured on {document['images']} images ({document.get('data') or 'given images'}); SNN at T={snn['timesteps']} (trained for T={document['model']['trained_timesteps']}).")
    lines += ["", "## Energy and latency per inference", "", "| target | ANN fp32 | ANN int8 | SNN | energy ratio (ANN/SNN) | vs int8 ANN | compute-only ratio | ANN latency | SNN latency |", "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in document["targets"].items():
        lines.append(
            f"| {name} | {_energy(entry['ann_energy_uj'])} | {_energy(entry['ann_int8_energy_uj'])} | {_energy(entry['snn_energy_uj'])} | {entry['energy_ratio']:.2f}× | {entry['energy_ratio_int8']:.2f}× | {entry['compute_energy_ratio']:.2f}× | {entry['ann_latency_ms']:.4g} ms | {entry['snn_latency_ms']:.4g} ms |"
        )
    lines += ["", "Targets: " + "; ".join(f"**{name}**: {entry['description']}" for name, entry in document["targets"].items()) + "."]
    lines += ["", "## Operations", "", f"ANN: {ann['macs']:,} MACs and {ann['elementwise_ops']:,} elementwise ops. SNN: {snn['macs']:,} MACs (image layer), {snn['acs']:,.0f} synaptic accumulates, {snn['neuron_updates']:,} neuron updates, mean spike rate {snn['spike_rate']:.4f} per neuron and step.", ""]
    lines += ["| layer | format | input | fan-in | ANN MACs | SNN MACs | SNN ACs | input density (SNN) | weight bytes |", "|---|---|---|---|---|---|---|---|---|"]
    for layer, ann_layer in zip(snn["layers"], ann["layers"]):
        density = "" if layer["input_density"] is None else f"{layer['input_density']:.4f}"
        lines.append(f"| {layer['name']} | {layer['weight_format']} | {layer['input']} | {layer['fan_in']} | {ann_layer['macs']:,} | {layer['macs']:,} | {layer['acs']:,.0f} | {density} | {layer['weight_bytes']:,} |")
    lines += ["", "| neuron layer | neurons | spike rate | spikes per inference |", "|---|---|---|---|"]
    for neuron in snn["neuron_layers"]:
        lines.append(f"| {neuron['name']} | {neuron['neurons']:,} | {neuron['spike_rate']:.4f} | {neuron['spikes']:,.1f} |")
    lines += ["", "## Memory", "", "| | weights | activations (all tensors) | peak arena | state (membranes) |", "|---|---|---|---|---|"]
    lines.append(f"| ANN fp32 | {ann['weight_bytes']:,} B | {ann['memory']['activation_bytes']:,} B | {ann['memory']['peak_bytes']:,} B | 0 |")
    lines.append(f"| ANN int8 | {ann['weight_bytes_int8']:,} B | {ann['memory_int8']['activation_bytes']:,} B | {ann['memory_int8']['peak_bytes']:,} B | 0 |")
    lines.append(f"| SNN | {snn['weight_bytes']:,} B | {snn['memory']['activation_bytes']:,} B | {snn['memory']['peak_bytes']:,} B | {snn['memory']['state_bytes']:,} B |")
    crossbar = document.get("crossbar")
    if crossbar:
        mapping = crossbar["mapping"]
        lines += ["", f"## Crossbar ({mapping['tile_size']}×{mapping['tile_size']} tiles)", "", f"{mapping['tiles']} tiles, {mapping['cells']:,} cells (a differential pair per weight).", ""]
        lines += ["| layer | cells | row tiles × column tiles | tiles | utilisation |", "|---|---|---|---|---|"]
        for row in mapping["layers"]:
            lines.append(f"| {row['name']} | {row['cell']} | {row['row_tiles']} × {row['column_tiles']} | {row['tiles']} | {row['utilisation']:.1%} |")
        metric = crossbar["metric"]
        mc = crossbar["monte_carlo"]
        config = mc["config"]
        settings = ", ".join(f"{key} {config[key]}" for key in ("variation", "faults", "stuck_on_share", "read_noise", "adc_bits", "on_off_ratio", "ir_drop", "seed"))
        lines += ["", f"Monte Carlo: {mc['trials']} trials × {mc['images']} images at T={mc['timesteps']} ({settings}); {mc['seconds']:.1f} s.", ""]
        lines += _mc_lines([("configured", mc)], metric)
        for parameter, points in crossbar.get("sweeps", {}).items():
            from .crossbar import SWEEP_AXES

            label, filename = SWEEP_AXES[parameter]
            lines += ["", f"### {metric} vs {label}", "", f"![{metric} vs {label}]({filename})", ""]
            lines += _mc_lines([(str(point["value"]), point) for point in points], metric, parameter)
        if crossbar.get("timesteps"):
            lines += ["", "### T=1 against T>1 under the same noise", "", "The same devices (same seed) at every T; read noise is drawn at every step.", ""]
            lines += _mc_lines([(f"T={row['timesteps']}", row) for row in crossbar["timesteps"]], metric, "T")
            if crossbar.get("timesteps_variation"):
                lines += ["", "![accuracy vs variation at each T](crossbar_timesteps.png)"]
    lines += ["", "## Constants", ""]
    for name, constants in document["constants"].items():
        lines += [f"**{name}** ({document['target_files'][name]})", "", "| constant | value | unit | source |", "|---|---|---|---|"]
        for key, constant in constants.items():
            lines.append(f"| {key} | {constant['value']:g} | {constant['unit']} | {constant['source']} |")
        lines.append("")
    lines += ["## Assumptions", ""] + [f"- {text}" for text in document["assumptions"]]
    if crossbar:
        lines.append("- Crossbar simulation: see `edgesnn/crossbar.py` — lognormal device variation, stuck cells at G_on or G_off, per-read Gaussian cell noise, per-column ADC with a range calibrated on the first images, first-order IR drop linear in the cell's distance from driver and sense amplifier; differential pairs, kernel-aligned row tiles.")
    return "\n".join(lines) + "\n"


def build_profile_config(timesteps: int) -> ProfileConfig:
    """The quick profile a build writes on a few synthetic images (``edgesnn profile`` runs the full
    one): every target; for a one-timestep model a Monte Carlo of 8 trials, three-point sweeps of 4
    trials and T=1 against T=4, on 16 images; for a T>1 model (T times the simulation cost) a 4-trial Monte Carlo
    on 64/T images, without sweeps."""
    from .crossbar import CrossbarConfig, SweepConfig

    if timesteps == 1:
        return ProfileConfig(
            crossbar=CrossbarConfig(variation=0.1, trials=8),
            sweeps=SweepConfig(variation=(0.0, 0.1, 0.3), faults=(0.0, 0.01, 0.05), adc_bits=(3, 5, 8), trials=4),
            compare_timesteps=(4,),
            compare_variation=False,
            images=16,
        )
    return ProfileConfig(crossbar=CrossbarConfig(variation=0.1, trials=4), images=max(2, 64 // timesteps))


def _mc_lines(rows: list[tuple[str, dict]], metric: str, header: str = "") -> list[str]:
    lines = [f"| {header or 'run'} | ideal accuracy | {metric} mean | 95% CI of the mean | 2.5–97.5% of trials | agreement with ideal | trials × images |", "|---|---|---|---|---|---|---|"]
    for name, row in rows:
        stats, agreement = row[metric], row["agreement"]
        ideal = "" if row["ideal_accuracy"] is None else f"{row['ideal_accuracy']:.4f}"
        lines.append(f"| {name} | {ideal} | {stats['mean']:.4f} | {stats['ci95'][0]:.4f}–{stats['ci95'][1]:.4f} | {stats['p2_5']:.4f}–{stats['p97_5']:.4f} | {agreement['mean']:.4f} | {row['trials']} × {row['images']} |")
    return lines


__all__ = [
    "report_markdown",
    "ProfileConfig",
    "ProfileError",
    "HardwareProfile",
    "Target",
    "TARGETS",
    "OP_CLASSES",
    "load_target",
    "count_ann",
    "count_snn",
    "price",
    "profile",
    "crossbar_layer_tiles",
]
