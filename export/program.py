"""Lowering a one-timestep SNN to an integer program, and the reference that runs it.

At T=1 a spiking layer is stateless: with v(0) = v0·θ, one step of
integrate-and-fire is

    s_c = [Σ W_c·x + b_c ≥ θ_c·(1 − v0)],     out_c = a·s_c.

Every value on the way is an integer times a known real scale, so the whole
network runs in integers:

- the image is an int16 tensor q (x = s_in·q), read from uint8 pixels through
  a 256-entry table per channel that applies the normalisation (int16, so
  that every pixel value keeps its own level: int8 would merge neighbours and
  flip first-layer spikes). Where the normalisation allows, the table is
  exact (``_exact_input_grid``); otherwise it rounds to 1/32767 of the range;
- a conv/linear layer sums integer weights (int8, or ±1 for a binary layer or
  a mixed layer's binary output channels) times integer inputs into an accumulator `acc` (its real value is σ_c·acc + b_c
  with σ_c = weight scale × input scale);
- a neuron fires where acc ≥ ⌈(θ_c(1 − v0) − b_c) / σ_c⌉, an integer threshold:
  the bias disappears into it and no rescaling is needed;
- spikes are bits with the scale a; average pooling sums them into small
  counts (the divisor moves into the scale), so a pooled map is a few bit
  planes and a binary layer can still run as popcounts over them;
- a residual add before a neuron brings its terms to one scale per channel
  with integer multipliers (≥ 2^14, rounded ratios of the terms' scales) and
  compares in 64 bits;
- the logits are the last accumulator times an integer multiplier per class
  plus an integer bias, at one common scale.

``lower`` turns a ``SpikingModel`` into a ``Program`` (a list of such integer
ops with their constant arrays). ``run_reference`` executes the program with
PyTorch on integer-valued tensors: it is the definition the C firmware must
match bit for bit. What separates it from the float model: the
int16 image where it is not exact, the rounded multipliers of residual adds
and logits, and int8 rounding of any layer that was not trained in its
deployed format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from edgesnn.artifacts import SpikingModel
from edgesnn.binarize import shared_amplitudes
from edgesnn.privatize import binary_rows, int8_weight
from edgesnn.errors import ExportError
from edgesnn.graph import Node

ADD_FRACTION_BITS = 14  # the terms of a residual add meet at 2^-14 of the finest term's scale
OUTPUT_FRACTION_BITS = 16  # the largest logit multiplier is 2^16
INT32_MAX = 2**31 - 1
INT64_SAFE = 2**62


@dataclass
class TensorSpec:
    """One tensor of the program: integer values of one sample, stored channels-last on the device."""

    name: str  # the graph node that produced it
    kind: str  # "s16" (the image), "bits" (unsigned values in `planes` bit planes; spikes have 1) or "s32" (accumulator)
    shape: tuple[int, int, int]  # C, H, W (a vector is C×1×1)
    maximum: int  # largest |value| the tensor can hold, from the weights: bounds every sum
    scale: np.ndarray  # float64 (C,): real value of channel c = scale[c]·q (+ bias[c] for "s32")
    bias: np.ndarray | None = None  # float64 (C,), "s32" only: real bias not yet added to the accumulator

    @property
    def planes(self) -> int:
        """Bit planes of a "bits" tensor: enough for its maximum."""
        return max(1, int(self.maximum).bit_length())


@dataclass
class Op:
    """One integer operation. ``arrays`` hold its constants; ``attrs`` plain ints."""

    kind: str  # conv, fire, add_fire, avgpool, maxpool, pad, slice, cat, output
    inputs: list[str]  # tensor names read
    output: str  # tensor name written
    source: str  # the graph node it implements, for messages
    attrs: dict = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Program:
    """A one-timestep SNN as integer ops."""

    tensors: dict[str, TensorSpec]
    ops: list[Op]
    input: str  # the image tensor
    output: str  # the logits: int64 vector, real logit = output_scale · value
    input_table: np.ndarray  # int16 (C, 256): the image value of each uint8 pixel, per channel
    input_scale: float  # real (normalised) value of one image step
    output_scale: float
    input_shape: tuple[int, int, int]
    num_classes: int


# ---------------------------------------------------------------------------
# Lowering


def _scalar_scale(spec: TensorSpec) -> float | None:
    """The tensor's scale when every channel shares it, else None."""
    scale = spec.scale
    return float(scale[0]) if np.all(np.abs(scale - scale[0]) <= 1e-12 * max(1e-30, float(np.abs(scale).max()))) else None


def _int8_codes(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: (codes, scale) with weight ≈ scale·codes (exact for int8-trained weights)."""
    rows = weight.reshape(weight.shape[0], -1)
    scale = np.abs(rows).max(1) / 127
    scale = np.where(scale > 0, scale, 1.0)
    codes = np.clip(np.round(rows / scale[:, None]), -127, 127).astype(np.int8)
    return codes.reshape(weight.shape), scale


def _binary_codes(weight: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(signs as ±1 int8, α) of a binarized layer, checking it holds ±α per output channel."""
    rows = weight.reshape(weight.shape[0], -1)
    alpha = np.abs(rows).mean(1)
    if not np.allclose(np.abs(rows), alpha[:, None], rtol=1e-4, atol=1e-12):
        raise ExportError(f"export: node {where!r} is marked binary but its weights are not ±α per output channel")
    signs = np.where(rows >= 0, 1, -1).astype(np.int8)
    return signs.reshape(weight.shape), alpha


def _mixed_codes(weight: np.ndarray, rows: list[int], where: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scale) of a mixed layer: ±1 and α in its binary output channels ``rows``, int8 elsewhere."""
    codes, scale = _int8_codes(weight)
    codes[rows], scale[rows] = _binary_codes(weight[rows], where)
    return codes, scale


class _Lowering:
    def __init__(self, model: SpikingModel):
        self.model = model
        self.graph = model.graph
        self.tensors: dict[str, TensorSpec] = {}
        self.ops: list[Op] = []
        self.value: dict[str, str] = {}  # graph node -> tensor holding its value
        self.flat: set[str] = set()  # tensors a reshape flattened (only a linear layer may read them)
        self.pending_add: dict[str, list[str]] = {}  # add node -> its input tensors, lowered with the neuron after it
        self.producer: dict[str, Op] = {}

    def error(self, node: Node, message: str) -> ExportError:
        where = f" ({node.source})" if node.source else ""
        return ExportError(f"export: node {node.name!r} ({node.op}){where}: {message}")

    def add_tensor(self, spec: TensorSpec) -> TensorSpec:
        self.tensors[spec.name] = spec
        return spec

    def emit(self, op: Op) -> None:
        self.ops.append(op)
        self.producer[op.output] = op

    def source(self, node: Node, index: int = 0) -> TensorSpec:
        name = node.inputs[index]
        if name in self.pending_add:
            raise self.error(node, f"reads the residual add {name!r}; only a neuron may follow an add in an export")
        tensor = self.value[name]
        if tensor in self.flat and node.op != "linear":
            raise self.error(node, "reads a flattened map; only a linear layer may follow a flatten")
        return self.tensors[tensor]

    # -- nodes --------------------------------------------------------------

    def lower(self) -> Program:
        for node in self.graph.nodes:
            handler = getattr(self, f"_{node.op}", None)
            if handler is None:
                raise self.error(node, "this op cannot be exported")
            handler(node)
        output = self._output(self.graph[self.graph.output])
        return Program(self.tensors, self.ops, "input", output, self.table, self.input_scale, self.output_scale, tuple(self.model.input_shape), self.model.num_classes)

    def _input(self, node: Node) -> None:
        channels = self.model.input_shape[0]
        mean, std = self.model.normalize or ((0.0,) * channels, (1.0,) * channels)
        mean = np.broadcast_to(np.asarray(mean, dtype=np.float64), (channels,))
        std = np.broadcast_to(np.asarray(std, dtype=np.float64), (channels,))
        exact = _exact_input_grid(mean, std)
        if exact is not None:
            self.table, self.input_scale = exact
        else:
            pixels = np.arange(256, dtype=np.float64) / 255
            normalised = (pixels[None, :] - mean[:, None]) / std[:, None]  # C×256
            self.input_scale = float(np.abs(normalised).max()) / 32767
            self.table = np.clip(np.round(normalised / self.input_scale), -32767, 32767).astype(np.int16)
        maximum = int(np.abs(self.table.astype(np.int64)).max())
        self.add_tensor(TensorSpec("input", "s16", tuple(self.model.input_shape), maximum, np.full(channels, self.input_scale)))
        self.value[node.name] = "input"

    def _identity(self, node: Node) -> None:
        self.value[node.name] = self.value[node.inputs[0]]

    def _reshape(self, node: Node) -> None:
        tensor = self.source(node)
        if len(node.shape) == 1 and tensor.shape[1] * tensor.shape[2] == 1 or len(node.shape) == 3 and tuple(node.shape) == tensor.shape:
            self.value[node.name] = tensor.name
        elif len(node.shape) == 1 and node.shape[0] == math.prod(tensor.shape):
            self.value[node.name] = tensor.name
            self.flat.add(tensor.name)
        else:
            raise self.error(node, f"reshape from {tensor.shape} to {tuple(node.shape)} is not a flatten")

    def _weighted(self, node: Node) -> None:
        tensor = self.source(node)
        weight = node.params["weight"].detach().double().numpy()
        if node.op == "linear":
            if weight.shape[1] != math.prod(tensor.shape):
                raise self.error(node, f"expects {weight.shape[1]} inputs but receives {tensor.shape}")
            # A linear layer on a C×H×W map is a convolution whose kernel covers the whole map.
            weight = weight.reshape(weight.shape[0], *tensor.shape)
            stride, padding, dilation, groups = (1, 1), (0, 0), (1, 1), 1
        else:
            a = node.attrs
            stride, padding, dilation, groups = tuple(a["stride"]), tuple(a["padding"]), tuple(a["dilation"]), a["groups"]
            if groups != 1 or dilation != (1, 1):
                raise self.error(node, f"groups={groups}, dilation={dilation}: only groups=1, dilation=1 can be exported")
            if isinstance(a["padding"], str):
                raise self.error(node, f"padding {a['padding']!r} must be given as integers")
        kind = node.attrs.get("weight_format", "float")
        rows = list(binary_rows(node))
        scale = _scalar_scale(tensor)
        if scale is None:
            if rows:
                raise self.error(node, "has binary channels but its input channels have different scales (run binarize with this version)")
            # Fold the per-channel input scale into the weights; int8 codes are then recomputed.
            scale = float(tensor.scale.max())
            weight = weight * (tensor.scale / scale).reshape(1, -1, 1, 1)
            kind = "float"
        if kind == "binary":
            codes, weight_scale = _binary_codes(weight, node.name)
        elif kind == "mixed":
            codes, weight_scale = _mixed_codes(weight, rows, node.name)
        else:
            codes, weight_scale = _int8_codes(weight)
        bias = node.params["bias"].detach().double().numpy() if "bias" in node.params else np.zeros(weight.shape[0])
        out_channels = weight.shape[0]
        height = (tensor.shape[1] + 2 * padding[0] - weight.shape[2]) // stride[0] + 1
        width = (tensor.shape[2] + 2 * padding[1] - weight.shape[3]) // stride[1] + 1
        maximum = int(np.abs(codes.reshape(out_channels, -1).astype(np.int64)).sum(1).max()) * tensor.maximum
        if maximum > INT32_MAX:
            raise self.error(node, f"its accumulator could reach {maximum}, beyond 32 bits")
        out = self.add_tensor(TensorSpec(node.name, "s32", (out_channels, height, width), maximum, weight_scale * scale, bias))
        self.emit(Op("conv", [tensor.name], out.name, node.name, {"stride": stride, "padding": padding, "binary": kind == "binary", "binary_rows": rows if kind == "mixed" else []}, {"weight": codes}))
        self.value[node.name] = out.name

    _conv = _weighted
    _linear = _weighted

    def _firing_level(self, node: Node, channels: int) -> np.ndarray:
        theta = self.model.thresholds[node.name].detach().double().numpy()
        return np.broadcast_to(theta * (1 - self.model.initial_membrane), (channels,)).astype(np.float64)

    def _spike_scale(self, node: Node, channels: int) -> np.ndarray:
        return np.broadcast_to(self.model.amplitude(node.name).detach().double().numpy(), (channels,)).astype(np.float64).copy()

    def _relu(self, node: Node) -> None:
        name = node.inputs[0]
        if name in self.pending_add:
            self._add_fire(node, self.pending_add.pop(name))
            return
        tensor = self.source(node)
        if tensor.kind != "s32":
            raise self.error(node, f"a neuron must follow a conv, linear, pooling of one, or add; it follows a {tensor.kind} tensor")
        channels = tensor.shape[0]
        level = self._firing_level(node, channels)
        threshold = _integer_threshold(level - tensor.bias, tensor.scale)
        spikes = self.add_tensor(TensorSpec(node.name, "bits", tensor.shape, 1, self._spike_scale(node, channels)))
        producer = self.producer.get(tensor.name)
        fuse = producer is not None and producer.kind == "conv" and len(self.graph.consumers(name)) == 1 and self.value[name] == tensor.name
        if fuse:
            # conv + fire in one kernel: the accumulator never reaches memory.
            producer.output = spikes.name
            producer.arrays["threshold"] = threshold.astype(np.int32)
            del self.tensors[tensor.name]
            self.producer[spikes.name] = producer
        else:
            self.emit(Op("fire", [tensor.name], spikes.name, node.name, {}, {"threshold": threshold.astype(np.int32)}))
        self.value[node.name] = spikes.name

    def _add(self, node: Node) -> None:
        consumers = self.graph.consumers(node.name)
        if len(consumers) != 1 or consumers[0].op != "relu":
            raise self.error(node, "a residual add must feed exactly one neuron to be exported")
        self.pending_add[node.name] = [self.source(node, index).name for index in range(len(node.inputs))]

    def _add_fire(self, neuron: Node, inputs: list[str]) -> None:
        terms = [self.tensors[name] for name in inputs]
        shape = terms[0].shape
        if any(term.shape != shape for term in terms):
            raise self.error(neuron, f"adds tensors of shapes {[t.shape for t in terms]}")
        channels = shape[0]
        accumulators = [term for term in terms if term.kind == "s32"]
        # One scale per channel, 2^-14 of the finest term's: every multiplier is ≥ 2^14, so rounding
        # it costs at most 2^-15 of that term.
        common = np.min([term.scale for term in terms], axis=0) / 2**ADD_FRACTION_BITS
        multipliers = [np.round(term.scale / common).astype(np.int64) for term in terms]
        if any((m > INT32_MAX).any() or (m < 1).any() for m in multipliers):
            raise self.error(neuron, "the terms of its residual add differ in scale by more than 2^17")
        bound = sum(int(m.max()) * term.maximum for m, term in zip(multipliers, terms))
        if bound > INT64_SAFE:
            raise self.error(neuron, "its residual add could overflow 64 bits")
        bias = sum(term.bias for term in accumulators) if accumulators else np.zeros(channels)
        threshold = _integer_threshold(self._firing_level(neuron, channels) - bias, common, wide=True)
        spikes = self.add_tensor(TensorSpec(neuron.name, "bits", shape, 1, self._spike_scale(neuron, channels)))
        arrays = {f"multiplier{index}": m.astype(np.int32) for index, m in enumerate(multipliers)}
        arrays["threshold"] = threshold
        self.emit(Op("add_fire", inputs, spikes.name, neuron.name, {"terms": len(terms)}, arrays))
        self.value[neuron.name] = spikes.name

    def _pool(self, node: Node, kind: str, kernel, stride, padding) -> None:
        tensor = self.source(node)
        kernel, stride, padding = _pair(kernel), _pair(stride if stride else kernel), _pair(padding)
        if tensor.kind == "s16":
            raise self.error(node, "pooling the image itself is not supported in an export")
        if tensor.kind == "s32" and any(padding) and kind == "avgpool":
            raise self.error(node, "average pooling with padding over a pre-neuron accumulator is not supported")
        height = (tensor.shape[1] + 2 * padding[0] - kernel[0]) // stride[0] + 1
        width = (tensor.shape[2] + 2 * padding[1] - kernel[1]) // stride[1] + 1
        if kind == "avgpool":
            window = kernel[0] * kernel[1]
            # The sum of the window is stored; the divisor moves into the scale.
            maximum, scale = tensor.maximum * window, tensor.scale / window
        else:
            maximum, scale = tensor.maximum, tensor.scale
        if tensor.kind == "s32" and maximum > INT32_MAX:
            raise self.error(node, "its pooled sums could exceed 32 bits")
        out = self.add_tensor(TensorSpec(node.name, tensor.kind, (tensor.shape[0], height, width), maximum, scale.copy(), None if tensor.bias is None else tensor.bias.copy()))
        self.emit(Op(kind, [tensor.name], out.name, node.name, {"kernel": kernel, "stride": stride, "padding": padding}))
        self.value[node.name] = out.name

    def _avgpool(self, node: Node) -> None:
        a = node.attrs
        if a["ceil_mode"]:
            raise self.error(node, "ceil_mode=True is not supported in an export")
        if any(_pair(a["padding"])) and not a["count_include_pad"]:
            raise self.error(node, "count_include_pad=False with padding is not supported in an export")
        self._pool(node, "avgpool", a["kernel"], a["stride"], a["padding"])

    def _maxpool(self, node: Node) -> None:
        a = node.attrs
        if a["ceil_mode"] or _pair(a["dilation"]) != (1, 1):
            raise self.error(node, "ceil_mode and dilation are not supported in an export")
        self._pool(node, "maxpool", a["kernel"], a["stride"], a["padding"])

    def _adaptive_avgpool(self, node: Node) -> None:
        tensor = self.source(node)
        size = _pair(node.attrs["output_size"])
        size = tuple(tensor.shape[1 + i] if s is None else s for i, s in enumerate(size))
        if tensor.shape[1] % size[0] or tensor.shape[2] % size[1]:
            raise self.error(node, f"adaptive pooling from {tensor.shape[1:]} to {size} has uneven windows")
        kernel = (tensor.shape[1] // size[0], tensor.shape[2] // size[1])
        self._pool(node, "avgpool", kernel, kernel, (0, 0))

    def _global_mean(self, node: Node) -> None:
        tensor = self.source(node)
        self._pool(node, "avgpool", tensor.shape[1:], tensor.shape[1:], (0, 0))

    def _pad(self, node: Node) -> None:
        tensor = self.source(node)
        if tensor.kind != "bits":
            raise self.error(node, "only spike maps can be padded in an export")
        pad = list(node.attrs["pad"]) + [0] * (6 - len(node.attrs["pad"]))
        left, right, top, bottom, front, back = pad
        if min(pad) < 0:
            raise self.error(node, "negative padding (cropping) is not supported in an export")
        channels, height, width = tensor.shape
        scale = np.pad(tensor.scale, (front, back), mode="edge")  # added channels are zero: any scale fits
        out = self.add_tensor(TensorSpec(node.name, "bits", (channels + front + back, height + top + bottom, width + left + right), tensor.maximum, scale))
        self.emit(Op("pad", [tensor.name], out.name, node.name, {"pad": (front, back, top, bottom, left, right)}))
        self.value[node.name] = out.name

    def _slice(self, node: Node) -> None:
        tensor = self.source(node)
        if tensor.kind != "bits":
            raise self.error(node, "only spike maps can be sliced in an export")
        a = node.attrs
        axis = a["dim"] - 1
        size = tensor.shape[axis]
        start, end, step = max(0, a["start"]), min(a["end"], size), a["step"]
        count = max(0, (end - start + step - 1) // step)
        shape = list(tensor.shape)
        shape[axis] = count
        scale = tensor.scale[start:end:step] if axis == 0 else tensor.scale
        out = self.add_tensor(TensorSpec(node.name, "bits", tuple(shape), tensor.maximum, scale.copy()))
        self.emit(Op("slice", [tensor.name], out.name, node.name, {"axis": axis, "start": start, "step": step, "count": count}))
        self.value[node.name] = out.name

    def _cat(self, node: Node) -> None:
        inputs = [self.source(node, index) for index in range(len(node.inputs))]
        if node.attrs["dim"] != 1 or any(t.kind != "bits" for t in inputs) or len({t.shape[1:] for t in inputs}) != 1:
            raise self.error(node, "only spike maps of one size, joined along channels, can be concatenated in an export")
        channels = sum(t.shape[0] for t in inputs)
        scale = np.concatenate([t.scale for t in inputs])
        out = self.add_tensor(TensorSpec(node.name, "bits", (channels, *inputs[0].shape[1:]), max(t.maximum for t in inputs), scale))
        self.emit(Op("cat", [t.name for t in inputs], out.name, node.name))
        self.value[node.name] = out.name

    def _batchnorm(self, node: Node) -> None:
        raise self.error(node, "a BatchNorm that could not be folded into a conv/linear cannot be exported")

    def _output(self, node: Node) -> str:
        tensor = self.tensors[self.value[node.name]]
        if tensor.kind == "s16":
            raise self.error(node, "the logits cannot be the image")
        bias = tensor.bias if tensor.bias is not None else np.zeros(tensor.shape[0])
        self.output_scale = float(tensor.scale.max()) / 2**OUTPUT_FRACTION_BITS
        multiplier = np.round(tensor.scale / self.output_scale).astype(np.int64)
        offset = np.round(bias / self.output_scale).astype(np.int64)
        if int(np.abs(multiplier).max()) * tensor.maximum + int(np.abs(offset).max()) > INT64_SAFE:
            raise self.error(node, "its logits could overflow 64 bits")
        channels = tensor.shape[0] * tensor.shape[1] * tensor.shape[2]
        if channels != self.model.num_classes:
            raise self.error(node, f"gives {channels} values, expected {self.model.num_classes} logits")
        self.add_tensor(TensorSpec("logits", "s64", (channels, 1, 1), 0, np.full(channels, self.output_scale)))
        self.emit(Op("output", [tensor.name], "logits", node.name, {}, {"multiplier": multiplier.astype(np.int32), "offset": offset}))
        return "logits"


def _exact_input_grid(mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, float] | None:
    """An int16 image that equals the normalised pixels exactly, where the normalisation allows it.

    x = (p/255 − m)/σ = (k·p − k·255·m) / (255·σ·k): when every channel has the
    same σ and k·255·m is an integer for some k ≤ 128, the table k·p − k·255·m
    (|q| ≤ 255·k < 2^15) at scale 1/(255·σ·k) loses nothing, and zero padding
    (x = 0) stays q = 0. Fashion-MNIST's (0.286, 0.353) takes k = 100.
    Otherwise None: the image is rounded to 1/32767 of its range.
    """
    if not np.allclose(std, std[0], rtol=1e-12, atol=0) or std[0] <= 0:
        return None
    for k in range(1, 129):
        offsets = k * 255 * mean
        if np.all(np.abs(offsets - np.round(offsets)) <= 1e-6):
            pixels = np.arange(256, dtype=np.int64)
            table = k * pixels[None, :] - np.round(offsets).astype(np.int64)[:, None]
            return table.astype(np.int16), float(1 / (255 * std[0] * k))
    return None


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[-1])) if len(value) else (0, 0)
    return int(value), int(value)


def _integer_threshold(level: np.ndarray, scale: np.ndarray, wide: bool = False) -> np.ndarray:
    """⌈level / scale⌉ per channel: acc ≥ it ⟺ scale·acc ≥ level (scale > 0). Saturated to the integer range."""
    limit = INT64_SAFE if wide else INT32_MAX
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(scale > 0, level / np.where(scale > 0, scale, 1), np.where(level <= 0, -np.inf, np.inf))
    # A tiny tolerance keeps a level that is an exact multiple of the scale from rounding up through float error.
    ratio = np.ceil(ratio - 1e-9 * np.maximum(1.0, np.abs(ratio)))
    return np.clip(np.nan_to_num(ratio, posinf=limit, neginf=-limit), -limit, limit).astype(np.int64 if wide else np.int32)


def check_finite(model: SpikingModel) -> None:
    """Refuse a model with NaN or infinite weights, biases, thresholds or amplitudes, naming the node."""
    for node in model.graph.nodes:
        for key, tensor in node.params.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ExportError(f"export: node '{node.name}' ({node.op}): its {key} holds NaN or infinite values; the model is corrupt")
    for kind, values in (("threshold", model.thresholds), ("spike amplitude", model.amplitudes)):
        for name, tensor in values.items():
            if not bool(torch.isfinite(tensor).all()):
                raise ExportError(f"export: node '{name}' (relu): its {kind} holds NaN or infinite values; the model is corrupt")


def deployment_model(model: SpikingModel) -> SpikingModel:
    """The one-timestep model exactly as every export computes it, as a float ``SpikingModel``.

    Spike amplitudes are shared per layer (an exact rewrite, see
    ``binarize.shared_amplitudes``) so that every spike map has one scale, and
    every layer not yet in a deployed format is quantized to int8. A model
    from ``binarize`` is returned unchanged: it was trained in this form.
    """
    check_finite(model)
    if model.timesteps != 1:
        raise ExportError(f"export: the integer program is for one-timestep models; this one runs T={model.timesteps} (build with --private, or --timesteps 1)")
    if len(model.amplitudes) < len(model.thresholds):
        if any(node.attrs.get("weight_format") in ("binary", "mixed") for node in model.graph.weighted()):
            raise ExportError("export: this model was binarized with per-channel spike amplitudes (an older edgesnn); rebuild its binarize stage to export it")
        model, _ = shared_amplitudes(model)
    if all(node.attrs.get("weight_format") in ("int8", "binary", "mixed") for node in model.graph.weighted()):
        return model
    graph = model.graph.copy()
    for node in graph.weighted():
        if node.attrs.get("weight_format") not in ("int8", "binary", "mixed"):
            node.params["weight"] = int8_weight(node.params["weight"])
            node.attrs["weight_format"] = "int8"
    return replace(model, graph=graph)


def lower(model: SpikingModel) -> Program:
    """The integer program of a one-timestep SNN (of its ``deployment_model``)."""
    return _Lowering(deployment_model(model)).lower()


# ---------------------------------------------------------------------------
# Reference


def pixels_from_images(images: torch.Tensor, normalize) -> torch.Tensor:
    """uint8 pixels of normalised float images (inverse of the normalisation, rounded)."""
    channels = images.shape[1]
    mean, std = normalize or ((0.0,) * channels, (1.0,) * channels)
    mean = torch.tensor(mean, dtype=torch.float64).reshape(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float64).reshape(1, -1, 1, 1)
    return ((images.double() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)


def images_from_pixels(pixels: torch.Tensor, normalize) -> torch.Tensor:
    """Normalised float32 images of uint8 pixels, as the model expects them."""
    channels = pixels.shape[1]
    mean, std = normalize or ((0.0,) * channels, (1.0,) * channels)
    mean = torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    return (pixels.float() / 255 - mean) / std


def run_reference(program: Program, pixels: torch.Tensor, keep: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
    """Run the program on N×C×H×W uint8 pixels: int64 logits N×classes (every tensor with ``keep``).

    Convolutions run in float64 on integer values; every sum is below 2^53 by
    construction (the lowering bounds each accumulator to 32 bits), so they are exact.
    """
    if pixels.dtype != torch.uint8 or tuple(pixels.shape[1:]) != tuple(program.input_shape):
        raise ExportError(f"export: reference input must be uint8 N×{'×'.join(map(str, program.input_shape))}, got {pixels.dtype} {tuple(pixels.shape)}")
    table = torch.from_numpy(program.input_table.astype(np.int64))
    channels = torch.arange(pixels.shape[1]).reshape(1, -1, 1, 1)
    values: dict[str, torch.Tensor] = {program.input: table[channels, pixels.long()]}
    for op in program.ops:
        values[op.output] = _REFERENCE[op.kind](op, [values[name] for name in op.inputs])
    return values if keep else values[program.output].reshape(len(pixels), -1)


def _per_channel(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array).astype(np.int64)).reshape(1, -1, 1, 1)


def _ref_conv(op: Op, inputs: list[torch.Tensor]) -> torch.Tensor:
    weight = torch.from_numpy(op.arrays["weight"].astype(np.float64))
    acc = F.conv2d(inputs[0].double(), weight, stride=op.attrs["stride"], padding=op.attrs["padding"]).round().long()
    return (acc >= _per_channel(op.arrays["threshold"])).long() if "threshold" in op.arrays else acc


def _ref_fire(op: Op, inputs: list[torch.Tensor]) -> torch.Tensor:
    return (inputs[0] >= _per_channel(op.arrays["threshold"])).long()


def _ref_add_fire(op: Op, inputs: list[torch.Tensor]) -> torch.Tensor:
    total = sum(value * _per_channel(op.arrays[f"multiplier{index}"]) for index, value in enumerate(inputs))
    return (total >= _per_channel(op.arrays["threshold"])).long()


def _ref_avgpool(op: Op, inputs: list[torch.Tensor]) -> torch.Tensor:
    kernel, stride, padding = op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"]
    summed = F.avg_pool2d(inputs[0].double(), kernel, stride, padding, count_include_pad=True, divisor_override=1)
    return summed.round().long()


def _ref_maxpool(op: Op, inputs: list[torch.Tensor]) -> torch.Tensor:
    return F.max_pool2d(inputs[0].double(), op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"]).round().long()


def _ref_pad(op: Op, inputs: list[torch.Tensor]) -> torch.Tensor:
    front, back, top, bottom, left, right = op.attrs["pad"]
    return F.pad(inputs[0], (left, right, top, bottom, front, back))


def _ref_slice(op: Op, inputs: list[torch.Tensor]) -> torch.Tensor:
    index = [slice(None)] * 4
    index[1 + op.attrs["axis"]] = slice(op.attrs["start"], op.attrs["start"] + op.attrs["step"] * op.attrs["count"], op.attrs["step"])
    return inputs[0][tuple(index)]


def _ref_cat(op: Op, inputs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(inputs, dim=1)


def _ref_output(op: Op, inputs: list[torch.Tensor]) -> torch.Tensor:
    return inputs[0] * _per_channel(op.arrays["multiplier"]) + _per_channel(op.arrays["offset"])


_REFERENCE = {
    "conv": _ref_conv,
    "fire": _ref_fire,
    "add_fire": _ref_add_fire,
    "avgpool": _ref_avgpool,
    "maxpool": _ref_maxpool,
    "pad": _ref_pad,
    "slice": _ref_slice,
    "cat": _ref_cat,
    "output": _ref_output,
}
