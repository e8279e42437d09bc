"""NIR graph of a one-timestep SNN, and an interpreter that runs the written file.

NIR (the Neuromorphic Intermediate Representation, package ``nir``) is what
neuromorphic toolchains read (Lava, Norse, snnTorch, Sinabs, SpiNNaker2,
Xylo…). ``nir_bytes(model, stamp)`` writes the model's ``deployment_model``
(the weights every other export uses) as an HDF5 ``.nir`` file; the image is
fed once (direct coding, T = 1). Node by node:

- conv → ``Conv2d`` (weight, bias, stride, padding); linear → ``Affine``;
- neuron → ``IF`` (r = 1, v_reset = 0, one value per element) then ``Scale``
  (the spike amplitude a, when it is not 1). At T = 1 the model fires where
  I ≥ θ(1 − v₀) (v₀θ is the initial membrane, folded into the threshold);
  NIR's IF fires where v > v_threshold, so ``v_threshold`` holds the largest
  float32 below θ(1 − v₀): in float32 the two conditions are the same;
- residual add → no node: NIR sums every edge that enters a node, so each term
  of the add is an edge into the neuron that follows it;
- average pooling (plain, adaptive with even windows, global mean) →
  ``AvgPool2d`` without padding;
- max pooling over a spike map → ``SumPool2d``, ``IF`` (threshold a/2),
  ``Scale`` (a): the maximum of values in {0, a} is a exactly where their sum
  exceeds a/2;
- flatten → ``Flatten``; the logits leave through ``Output``.

NIR 1.0 has no zero padding of channels, slicing or concatenation: a model
with those ops (option-A shortcuts) gets an ``ExportError`` naming the node.

NIR has no bit-width field. Quantization is kept in the **node metadata** of
the file (no sidecar): every Conv2d/Affine node carries
``edgesnn_weight_format`` ("binary", "int8" or "mixed"), ``edgesnn_weight_bits`` (1 or
8; a mixed layer: one per output channel) and ``edgesnn_weight_scale`` (per output channel: α for α·sign(W), the
int8 step otherwise), so weight / scale gives the ±1 or int8 codes. IF nodes
carry ``edgesnn_threshold`` (θ), ``edgesnn_initial_membrane`` (v₀) and
``edgesnn_fires_at`` (θ(1 − v₀), the ≥ comparison). The graph's metadata
holds the edgesnn version and stamp, T = 1, and the input normalisation.

``run_nir(data, images)`` reads the file back with ``nir.read`` (type
checked) and evaluates the graph for one timestep in PyTorch float32, so the
artifact itself, not the model it came from, is what ``edgesnn eval`` scores.
"""

from __future__ import annotations

import io
import math
from collections import deque

import numpy as np
import torch
import torch.nn.functional as F

from edgesnn import __version__
from edgesnn.artifacts import SpikingModel
from edgesnn.errors import ExportError
from edgesnn.privatize import binary_rows
from edgesnn.graph import Node

from .program import deployment_model

NIR_FILE = "model.nir"


def _nir():
    try:
        import nir
    except ImportError as error:  # pragma: no cover - nir is a dependency
        raise ExportError("nir: the 'nir' package is not installed (pip install nir)") from error
    return nir


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[-1])) if len(value) else (0, 0)
    return int(value), int(value)


def _float32_below(values: np.ndarray) -> np.ndarray:
    """The largest float32 strictly below each value: v > it ⟺ v ≥ value, for float32 v."""
    values = np.asarray(values, dtype=np.float32)
    return np.nextafter(values, np.float32(-np.inf)).astype(np.float32)


class _NirWriter:
    """Walks a deployment model's graph in order and builds NIR nodes and edges."""

    def __init__(self, model: SpikingModel, stamp: str | None):
        self.nir = _nir()
        self.model = model
        self.graph = model.graph
        self.stamp = stamp
        self.nodes: dict = {}
        self.edges: list[tuple[str, str]] = []
        self.value: dict[str, list[str]] = {}  # graph node -> NIR nodes whose summed outputs are its value
        self.spiking: dict[str, float] = {}  # graph node -> its spike amplitude, where its value is a spike map

    def error(self, node: Node, message: str) -> ExportError:
        return ExportError(f"export: nir: node '{node.name}' ({node.op}): {message}")

    def add(self, name: str, nir_node, sources: list[str]) -> str:
        if name in self.nodes:
            raise ExportError(f"export: nir: two nodes would be named {name!r}")
        self.nodes[name] = nir_node
        self.edges.extend((source, name) for source in sources)
        return name

    def write(self) -> bytes:
        for node in self.graph.nodes:
            handler = getattr(self, f"_{node.op}", None)
            if handler is None:
                raise self.error(node, "NIR 1.0 has no node for this op; export onnx, tflite or c instead")
            handler(node)
        output = self.graph[self.graph.output]
        shape = np.array(output.shape, dtype=np.int64)
        self.add("output", self.nir.Output(output_type={"output": shape}), self.value[output.name])
        normalize = self.model.normalize
        metadata = {
            "edgesnn_version": __version__,
            "edgesnn_stamp": self.stamp or f"edgesnn {__version__}",
            "edgesnn_timesteps": 1,
            "edgesnn_input": "float32 C×H×W images normalised by edgesnn_normalize_mean/std, fed once (direct coding)",
        }
        if normalize:
            metadata["edgesnn_normalize_mean"] = np.asarray(normalize[0], dtype=np.float64)
            metadata["edgesnn_normalize_std"] = np.asarray(normalize[1], dtype=np.float64)
        try:
            graph = self.nir.NIRGraph(nodes=self.nodes, edges=self.edges, metadata=metadata)
            buffer = io.BytesIO()
            self.nir.write(buffer, graph)
        except (ValueError, TypeError, KeyError) as error:
            raise ExportError(f"export: nir: the nir package refused the graph: {error}") from error
        return buffer.getvalue()

    # One method per graph op -------------------------------------------------

    def _input(self, node: Node) -> None:
        shape = np.array(node.shape or self.model.input_shape, dtype=np.int64)
        self.value[node.name] = [self.add("input", self.nir.Input(input_type={"input": shape}), [])]

    def _identity(self, node: Node) -> None:
        self.value[node.name] = self.value[node.inputs[0]]
        if node.inputs[0] in self.spiking:
            self.spiking[node.name] = self.spiking[node.inputs[0]]

    def _weight_metadata(self, node: Node, weight: np.ndarray) -> dict:
        kind = node.attrs.get("weight_format", "float")
        rows = weight.reshape(weight.shape[0], -1)
        binary = np.zeros(len(rows), dtype=bool)
        binary[list(binary_rows(node))] = True
        scale = np.where(binary, np.abs(rows).max(1), np.abs(rows).max(1) / 127).astype(np.float32)
        if kind == "binary":
            return {"edgesnn_weight_format": "binary", "edgesnn_weight_bits": 1, "edgesnn_weight_scale": scale}
        if kind == "mixed":
            return {"edgesnn_weight_format": "mixed", "edgesnn_weight_bits": np.where(binary, 1, 8).astype(np.int64), "edgesnn_weight_scale": scale}
        return {"edgesnn_weight_format": "int8", "edgesnn_weight_bits": 8, "edgesnn_weight_scale": scale}

    def _conv(self, node: Node) -> None:
        a = node.attrs
        if isinstance(a["padding"], str):
            raise self.error(node, f"padding {a['padding']!r} must be given as integers")
        weight = node.params["weight"].detach().float().numpy()
        bias = node.params["bias"].detach().float().numpy() if "bias" in node.params else np.zeros(weight.shape[0], dtype=np.float32)
        source = self.graph[node.inputs[0]]
        conv = self.nir.Conv2d(
            input_shape=tuple(int(v) for v in source.shape[1:]),
            weight=weight,
            stride=_pair(a["stride"]),
            padding=_pair(a["padding"]),
            dilation=_pair(a["dilation"]),
            groups=int(a["groups"]),
            bias=bias,
            metadata=self._weight_metadata(node, weight),
        )
        self.value[node.name] = [self.add(node.name, conv, self.value[node.inputs[0]])]

    def _linear(self, node: Node) -> None:
        weight = node.params["weight"].detach().float().numpy()
        bias = node.params["bias"].detach().float().numpy() if "bias" in node.params else np.zeros(weight.shape[0], dtype=np.float32)
        source = self.graph[node.inputs[0]]
        if len(source.shape) != 1:
            raise self.error(node, f"a linear layer must read a flat vector, it reads {tuple(source.shape)} (flatten first)")
        affine = self.nir.Affine(weight=weight, bias=bias, metadata=self._weight_metadata(node, weight))
        self.value[node.name] = [self.add(node.name, affine, self.value[node.inputs[0]])]

    def _relu(self, node: Node) -> None:
        if node.name not in self.model.thresholds:
            raise self.error(node, "this ReLU has no threshold: it is not a spiking neuron of the model")
        shape = tuple(int(v) for v in node.shape)
        theta = self.model.thresholds[node.name].detach().double().numpy()
        level = theta * (1 - self.model.initial_membrane)
        per_element = np.broadcast_to(level.reshape(-1, *([1] * (len(shape) - 1))) if level.size > 1 else level, shape)
        amplitude = self.model.amplitude(node.name).detach().double().numpy()
        if amplitude.size != 1:
            raise self.error(node, "spike amplitudes differ between channels (run binarize or export with this version)")
        neuron = self.nir.IF(
            r=np.ones(shape, dtype=np.float32),
            v_threshold=_float32_below(per_element),
            v_reset=np.zeros(shape, dtype=np.float32),
            metadata={
                "edgesnn_threshold": np.asarray(theta, dtype=np.float32).reshape(-1),
                "edgesnn_initial_membrane": float(self.model.initial_membrane),
                "edgesnn_fires_at": np.asarray(level, dtype=np.float32).reshape(-1),
                "edgesnn_condition": "fires where the summed input I >= edgesnn_fires_at; v_threshold is the largest float32 below it",
            },
        )
        name = self.add(node.name, neuron, self.value[node.inputs[0]])
        self.value[node.name] = [self._amplitude(name, float(amplitude.reshape(())), shape)]
        self.spiking[node.name] = float(amplitude.reshape(()))

    def _amplitude(self, name: str, amplitude: float, shape: tuple[int, ...]) -> str:
        if amplitude == 1.0:
            return name
        return self.add(f"{name}.amplitude", self.nir.Scale(scale=np.full(shape, amplitude, dtype=np.float32)), [name])

    def _add(self, node: Node) -> None:
        # NIR sums the edges entering a node: the add is the list of its terms.
        self.value[node.name] = [name for source in node.inputs for name in self.value[source]]

    def _pool_nodes(self, node: Node, kernel, stride, padding):
        kernel, stride, padding = _pair(kernel), _pair(stride if stride else kernel), _pair(padding)
        return np.array(kernel), np.array(stride), np.array(padding)

    def _avgpool(self, node: Node) -> None:
        a = node.attrs
        if a["ceil_mode"] or any(_pair(a["padding"])):
            raise self.error(node, "NIR's AvgPool2d is exported without padding or ceil_mode")
        self._average(node, a["kernel"], a["stride"])

    def _average(self, node: Node, kernel, stride) -> None:
        kernel, stride, padding = self._pool_nodes(node, kernel, stride, 0)
        pool = self.nir.AvgPool2d(kernel_size=kernel, stride=stride, padding=padding)
        self.value[node.name] = [self.add(node.name, pool, self.value[node.inputs[0]])]
        if node.inputs[0] in self.spiking:
            self.spiking.pop(node.name, None)  # an average of spikes is no longer a spike map

    def _adaptive_avgpool(self, node: Node) -> None:
        source = self.graph[node.inputs[0]]
        size = _pair(node.attrs["output_size"]) if node.attrs["output_size"] is not None else tuple(source.shape[1:])
        size = tuple(source.shape[1 + i] if s is None else s for i, s in enumerate(size))
        if source.shape[1] % size[0] or source.shape[2] % size[1]:
            raise self.error(node, f"adaptive pooling from {tuple(source.shape[1:])} to {size} has uneven windows")
        kernel = (source.shape[1] // size[0], source.shape[2] // size[1])
        self._average(node, kernel, kernel)

    def _global_mean(self, node: Node) -> None:
        source = self.graph[node.inputs[0]]
        if len(source.shape) != 3:
            raise self.error(node, f"a global mean over {tuple(source.shape)} is not a spatial average")
        kernel = tuple(source.shape[1:])
        self._average(node, kernel, kernel)
        if not node.attrs.get("keepdim", True):
            pooled = self.value[node.name][0]
            flat = self.nir.Flatten(input_type={"input": np.array([source.shape[0], 1, 1])}, start_dim=0, end_dim=-1)
            self.value[node.name] = [self.add(f"{node.name}.flatten", flat, [pooled])]

    def _maxpool(self, node: Node) -> None:
        a = node.attrs
        if a["ceil_mode"] or _pair(a["dilation"]) != (1, 1):
            raise self.error(node, "ceil_mode and dilation are not supported in an export")
        if node.inputs[0] not in self.spiking:
            raise self.error(node, "NIR 1.0 has no max pooling; it is exported only over a spike map (as a sum and a threshold)")
        amplitude = self.spiking[node.inputs[0]]
        kernel, stride, padding = self._pool_nodes(node, a["kernel"], a["stride"], a["padding"])
        shape = tuple(int(v) for v in node.shape)
        summed = self.add(f"{node.name}.sum", self.nir.SumPool2d(kernel_size=kernel, stride=stride, padding=padding), self.value[node.inputs[0]])
        fire = self.nir.IF(
            r=np.ones(shape, dtype=np.float32),
            v_threshold=np.full(shape, amplitude / 2, dtype=np.float32),
            v_reset=np.zeros(shape, dtype=np.float32),
            metadata={"edgesnn_op": "maxpool", "edgesnn_condition": "max of spikes in {0, a} = a where their sum > a/2"},
        )
        name = self.add(node.name, fire, [summed])
        self.value[node.name] = [self._amplitude(name, amplitude, shape)]
        self.spiking[node.name] = amplitude

    def _reshape(self, node: Node) -> None:
        source = self.graph[node.inputs[0]]
        if tuple(node.shape) == tuple(source.shape):
            self._identity(node)
            return
        if len(node.shape) != 1 or node.shape[0] != math.prod(source.shape):
            raise self.error(node, f"reshape from {tuple(source.shape)} to {tuple(node.shape)} is not a flatten")
        flat = self.nir.Flatten(input_type={"input": np.array(source.shape, dtype=np.int64)}, start_dim=0, end_dim=-1)
        self.value[node.name] = [self.add(node.name, flat, self.value[node.inputs[0]])]
        if node.inputs[0] in self.spiking:
            self.spiking[node.name] = self.spiking[node.inputs[0]]

    def _batchnorm(self, node: Node) -> None:
        raise self.error(node, "a BatchNorm that could not be folded into a conv/linear cannot be exported")


NIR_OPS = frozenset({"input", "identity", "conv", "linear", "relu", "add", "avgpool", "adaptive_avgpool", "global_mean", "maxpool", "reshape"})  # the graph ops _NirWriter writes


def nir_refusal(model: SpikingModel) -> str | None:
    """Why the NIR export cannot express this model (the first node NIR 1.0 has no form for), or None."""
    for node in model.graph.nodes:
        if node.op not in NIR_OPS:
            return f"node '{node.name}' ({node.op}) has no NIR 1.0 node"
    return None


def nir_bytes(model: SpikingModel, stamp: str | None = None) -> bytes:
    """The ``.nir`` (HDF5) file of a one-timestep model's deployment form."""
    return _NirWriter(deployment_model(model), stamp).write()


# ---------------------------------------------------------------------------
# Interpreter


def read_nir(data: bytes):
    """The NIRGraph of a ``.nir`` file's bytes, type checked by the nir package."""
    nir = _nir()
    try:
        return nir.read(io.BytesIO(data))
    except Exception as error:  # h5py and nir raise many kinds on a broken file
        raise ExportError(f"nir: cannot read the file: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from error


def _order(graph) -> list[str]:
    incoming = {name: 0 for name in graph.nodes}
    following: dict[str, list[str]] = {name: [] for name in graph.nodes}
    for source, target in graph.edges:
        if source not in incoming or target not in incoming:
            raise ExportError(f"nir: edge {source!r} -> {target!r} names a node that is not in the graph")
        incoming[target] += 1
        following[source].append(target)
    ready = deque(name for name, count in incoming.items() if count == 0)
    order = []
    while ready:
        name = ready.popleft()
        order.append(name)
        for target in following[name]:
            incoming[target] -= 1
            if incoming[target] == 0:
                ready.append(target)
    if len(order) != len(graph.nodes):
        raise ExportError("nir: the graph has a cycle; a one-timestep run needs a feed-forward graph")
    return order


def _tensor(value) -> torch.Tensor:
    return torch.from_numpy(np.asarray(value, dtype=np.float32))


def _step(nir, node, x: torch.Tensor) -> torch.Tensor:
    """One timestep of one node from a reset state, on a batch N×(node input shape)."""
    if isinstance(node, (nir.Input, nir.Output)):
        return x
    if isinstance(node, nir.Conv2d):
        padding = node.padding if isinstance(node.padding, str) else tuple(int(v) for v in node.padding)
        return F.conv2d(x, _tensor(node.weight), _tensor(node.bias), tuple(int(v) for v in node.stride), padding, tuple(int(v) for v in node.dilation), int(node.groups))
    if isinstance(node, nir.Affine):
        return F.linear(x, _tensor(node.weight), _tensor(node.bias))
    if isinstance(node, nir.Linear):
        return F.linear(x, _tensor(node.weight))
    if isinstance(node, nir.IF):
        return (_tensor(node.r) * x > _tensor(node.v_threshold)).float()
    if isinstance(node, nir.Scale):
        return x * _tensor(node.scale)
    if isinstance(node, (nir.AvgPool2d, nir.SumPool2d)):
        kernel = tuple(int(v) for v in np.atleast_1d(node.kernel_size))
        stride = tuple(int(v) for v in np.atleast_1d(node.stride))
        padding = tuple(int(v) for v in np.atleast_1d(node.padding))
        divisor = 1 if isinstance(node, nir.SumPool2d) else None
        return F.avg_pool2d(x, kernel, stride, padding, count_include_pad=True, divisor_override=divisor)
    if isinstance(node, nir.Flatten):
        end = int(node.end_dim)
        return x.flatten(int(node.start_dim) + 1, end + 1 if end >= 0 else end)
    raise ExportError(f"nir: node type {type(node).__name__} cannot be run by edgesnn's interpreter")


def run_nir(data: bytes, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Logits (float32 N×classes) of a ``.nir`` file for one timestep, on N×C×H×W normalised images."""
    nir = _nir()
    graph = read_nir(data)
    inputs = [name for name, node in graph.nodes.items() if isinstance(node, nir.Input)]
    outputs = [name for name, node in graph.nodes.items() if isinstance(node, nir.Output)]
    if len(inputs) != 1 or len(outputs) != 1:
        raise ExportError(f"nir: expected one Input and one Output node, found {len(inputs)} and {len(outputs)}")
    expected = tuple(int(v) for v in graph.nodes[inputs[0]].input_type["input"])
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ExportError(f"nir: images are {images.shape[1:]}, the graph expects {expected}")
    order = _order(graph)
    sources: dict[str, list[str]] = {name: [] for name in graph.nodes}
    for source, target in graph.edges:
        sources[target].append(source)
    results = []
    with torch.no_grad():
        for first in range(0, len(images), batch):
            values: dict[str, torch.Tensor] = {}
            for name in order:
                if name == inputs[0]:
                    x = torch.from_numpy(images[first : first + batch])
                elif sources[name]:
                    x = values[sources[name][0]]
                    for source in sources[name][1:]:
                        x = x + values[source]  # NIR sums the edges that enter a node
                else:
                    raise ExportError(f"nir: node {name!r} has no input")
                values[name] = _step(nir, graph.nodes[name], x)
            results.append(values[outputs[0]].reshape(len(values[outputs[0]]), -1).numpy())
    return np.concatenate(results) if results else np.zeros((0, int(np.prod(graph.nodes[outputs[0]].output_type["output"]))), dtype=np.float32)


__all__ = ["NIR_FILE", "NIR_OPS", "nir_bytes", "nir_refusal", "read_nir", "run_nir"]
