"""The network as edgesnn sees it: a small graph of supported ops, and its executor.

A ``Graph`` is a topologically ordered list of ``Node``s. Each node has an op
from ``OPS``, its input node names, plain attributes and parameter tensors. The
graph is what every stage after capture works on: convert folds BatchNorm and
calibrates neurons on it, later stages retrain and export it.

``GraphNetwork`` runs a graph as an ``nn.Module``. Every op becomes a real
module (``nn.Conv2d``, ``nn.BatchNorm2d``, ...), so hooks, autograd and
``state_dict`` work as usual; the activation of each ``relu`` node can be
swapped for another module (an integrate-and-fire neuron, for instance).

Serialisation (``Graph.to_dict`` / ``Graph.from_dict``) uses only strings,
numbers, lists, dicts and tensors, so a saved graph loads with
``torch.load(weights_only=True)``: loading a model never runs pickle code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ArtifactError

GRAPH_FORMAT_VERSION = 1


@dataclass
class Node:
    """One op of the network."""

    name: str  # unique name: the module path for layers ("layers.0.conv1"), else the traced op's name
    op: str  # a key of OPS
    inputs: tuple[str, ...]  # names of the nodes whose outputs feed this op, in argument order
    attrs: dict[str, Any] = field(default_factory=dict)  # op attributes: ints, floats, tuples
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # weight, bias, running_mean, ...
    shape: tuple[int, ...] = ()  # output shape of one sample (no batch dimension)
    source: str = ""  # where the op is defined in the user's code, for error messages


@dataclass
class Graph:
    """A feed-forward (possibly residual) network of supported ops."""

    nodes: list[Node]  # topological order; nodes[0] is the single "input" node
    output: str  # name of the node whose value is the network's output (logits)

    def __post_init__(self) -> None:
        self._index = {node.name: node for node in self.nodes}

    def __getitem__(self, name: str) -> Node:
        return self._index[name]

    def __contains__(self, name: str) -> bool:
        return name in self._index

    @property
    def input(self) -> Node:
        return self.nodes[0]

    def consumers(self, name: str) -> list[Node]:
        """The nodes that take ``name``'s output as an input."""
        return [node for node in self.nodes if name in node.inputs]

    def of_op(self, *ops: str) -> list[Node]:
        return [node for node in self.nodes if node.op in ops]

    def neurons(self) -> list[Node]:
        """The ReLU nodes: the places where the SNN has spiking neurons."""
        return self.of_op("relu")

    def weighted(self) -> list[Node]:
        """Conv and linear nodes, in order."""
        return self.of_op("conv", "linear")

    def replaced(self, nodes: list[Node], output: str | None = None) -> "Graph":
        return Graph(nodes, output or self.output)

    def copy(self) -> "Graph":
        """A deep copy: parameters are cloned, so edits to the copy never touch this graph."""
        return Graph(
            [
                Node(n.name, n.op, tuple(n.inputs), dict(n.attrs), {k: v.detach().clone() for k, v in n.params.items()}, tuple(n.shape), n.source)
                for n in self.nodes
            ],
            self.output,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values and tensors only: safe for ``torch.load(weights_only=True)``."""
        return {
            "format": "edgesnn-graph",
            "version": GRAPH_FORMAT_VERSION,
            "output": self.output,
            "nodes": [
                {
                    "name": n.name,
                    "op": n.op,
                    "inputs": list(n.inputs),
                    "attrs": {k: _plain(v) for k, v in n.attrs.items()},
                    "params": {k: v.detach().contiguous() for k, v in n.params.items()},
                    "shape": list(n.shape),
                    "source": n.source,
                }
                for n in self.nodes
            ],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "graph") -> "Graph":
        """Rebuild a graph saved by ``to_dict``, checking every field."""
        if not isinstance(data, dict) or data.get("format") != "edgesnn-graph":
            raise ArtifactError(f"{where}: not an edgesnn graph")
        if data.get("version") != GRAPH_FORMAT_VERSION:
            raise ArtifactError(f"{where}: graph format version {data.get('version')!r}, expected {GRAPH_FORMAT_VERSION}")
        nodes: list[Node] = []
        seen: set[str] = set()
        for index, raw in enumerate(data.get("nodes", [])):
            try:
                node = Node(
                    str(raw["name"]),
                    str(raw["op"]),
                    tuple(str(i) for i in raw["inputs"]),
                    {k: _unplain(v) for k, v in dict(raw["attrs"]).items()},
                    dict(raw["params"]),
                    tuple(int(s) for s in raw["shape"]),
                    str(raw.get("source", "")),
                )
            except (KeyError, TypeError, ValueError) as error:
                raise ArtifactError(f"{where}: node {index} is malformed ({error})") from None
            if node.op not in OPS:
                raise ArtifactError(f"{where}: node {node.name!r} has unknown op {node.op!r}")
            missing = [i for i in node.inputs if i not in seen]
            if missing:
                raise ArtifactError(f"{where}: node {node.name!r} uses {missing[0]!r} before it is defined")
            for key, tensor in node.params.items():
                if not isinstance(tensor, torch.Tensor):
                    raise ArtifactError(f"{where}: node {node.name!r} parameter {key!r} is not a tensor")
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise ArtifactError(f"{where}: node {node.name!r} parameter {key!r} contains NaN or Inf")
            seen.add(node.name)
            nodes.append(node)
        if not nodes or nodes[0].op != "input":
            raise ArtifactError(f"{where}: the first node must be the input")
        output = data.get("output")
        if output not in seen:
            raise ArtifactError(f"{where}: output node {output!r} does not exist")
        return cls(nodes, output)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"tuple": [_plain(v) for v in value]}
    return value


def _unplain(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"tuple"}:
        return tuple(_unplain(v) for v in value["tuple"])
    return value


# ---------------------------------------------------------------------------
# Op table: op name -> builder of the module that executes it. Ops without a
# module (add, cat) are evaluated in GraphNetwork.forward.


class Reshape(nn.Module):
    """Reshape every sample to ``shape`` (the batch dimension is kept)."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


class ZeroPad(nn.Module):
    """Zero padding with ``F.pad``'s argument order (last dimension first)."""

    def __init__(self, pad: tuple[int, ...]):
        super().__init__()
        self.pad = tuple(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pad)


class Slice(nn.Module):
    """``x[..., start:end:step, ...]`` along one non-batch dimension."""

    def __init__(self, dim: int, start: int, end: int, step: int):
        super().__init__()
        self.dim, self.start, self.end, self.step = dim, start, end, step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = [slice(None)] * x.dim()
        index[self.dim] = slice(self.start, self.end, self.step)
        return x[tuple(index)]


class GlobalMean(nn.Module):
    """Mean over the spatial dimensions (``x.mean((2, 3), keepdim)``)."""

    def __init__(self, keepdim: bool):
        super().__init__()
        self.keepdim = keepdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=self.keepdim)


class ClippedReLU(nn.Module):
    """``min(max(x, 0), ceiling)``: ReLU, or ReLU6 / hardtanh(0, c) / clamp(0, c) when clipped."""

    def __init__(self, ceiling: float | None):
        super().__init__()
        self.ceiling = ceiling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) if self.ceiling is None else torch.clamp(x, 0.0, self.ceiling)


def _conv(node: Node) -> nn.Module:
    weight = node.params["weight"]
    a = node.attrs
    module = nn.Conv2d(
        weight.shape[1] * a["groups"], weight.shape[0], tuple(weight.shape[2:]), a["stride"], a["padding"], a["dilation"], a["groups"], bias="bias" in node.params
    )
    _load(module, node)
    return module


def _linear(node: Node) -> nn.Module:
    weight = node.params["weight"]
    module = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in node.params)
    _load(module, node)
    return module


def _batchnorm(node: Node) -> nn.Module:
    channels = node.params["running_mean"].numel()
    kind = nn.BatchNorm2d if len(node.shape) == 3 else nn.BatchNorm1d
    module = kind(channels, eps=node.attrs["eps"], affine="weight" in node.params)
    _load(module, node)
    return module


def _load(module: nn.Module, node: Node) -> None:
    with torch.no_grad():
        for key, tensor in node.params.items():
            getattr(module, key).copy_(tensor)


BuildModule = Callable[[Node], "nn.Module | None"]

OPS: dict[str, BuildModule] = {
    "input": lambda node: None,
    "conv": _conv,
    "linear": _linear,
    "batchnorm": _batchnorm,
    "relu": lambda node: ClippedReLU(node.attrs.get("ceiling")),
    "avgpool": lambda node: nn.AvgPool2d(node.attrs["kernel"], node.attrs["stride"], node.attrs["padding"], node.attrs["ceil_mode"], node.attrs["count_include_pad"]),
    "maxpool": lambda node: nn.MaxPool2d(node.attrs["kernel"], node.attrs["stride"], node.attrs["padding"], node.attrs["dilation"], ceil_mode=node.attrs["ceil_mode"]),
    "adaptive_avgpool": lambda node: nn.AdaptiveAvgPool2d(node.attrs["output_size"]),
    "global_mean": lambda node: GlobalMean(node.attrs["keepdim"]),
    "reshape": lambda node: Reshape(node.shape),
    "pad": lambda node: ZeroPad(node.attrs["pad"]),
    "slice": lambda node: Slice(node.attrs["dim"], node.attrs["start"], node.attrs["end"], node.attrs["step"]),
    "identity": lambda node: nn.Identity(),
    "add": lambda node: None,
    "cat": lambda node: None,
}


def module_key(name: str) -> str:
    """``nn.ModuleDict`` keys cannot contain dots."""
    return name.replace(".", "__")


def _broadcast_time(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Align tensors of which some carry T·B samples and others B (constant in time)."""
    largest = max(t.shape[0] for t in tensors)
    aligned = []
    for tensor in tensors:
        if tensor.shape[0] != largest:
            repeats = largest // tensor.shape[0]
            tensor = tensor.unsqueeze(0).expand(repeats, *tensor.shape).reshape(largest, *tensor.shape[1:])
        aligned.append(tensor)
    return aligned


class GraphNetwork(nn.Module):
    """Runs a ``Graph``. ``activations`` replaces the module of chosen relu nodes.

    Inputs are N×C×H×W; the batch dimension is carried through every op, so a
    spiking simulation can fold its T timesteps into it (T·B samples). Where a
    value is constant in time it may stay at B samples: ``add`` and ``cat``
    broadcast it.
    """

    def __init__(self, graph: Graph, activations: dict[str, nn.Module] | None = None):
        super().__init__()
        self.graph = graph
        activations = activations or {}
        self.layers = nn.ModuleDict()
        for node in graph.nodes:
            module = activations[node.name] if node.name in activations else OPS[node.op](node)
            if module is not None:
                self.layers[module_key(node.name)] = module
        # Free each value after its last use: keeps peak memory at one residual block.
        last_use: dict[str, int] = {}
        for index, node in enumerate(graph.nodes):
            for name in node.inputs:
                last_use[name] = index
        self.eval()  # a captured network runs with its BatchNorm running statistics
        self._release = [sorted({name for name in node.inputs if last_use[name] == index and name != graph.output}) for index, node in enumerate(graph.nodes)]

    def layer(self, name: str) -> nn.Module:
        return self.layers[module_key(name)]

    def rebuild(self, node: Node) -> None:
        """Rebuild the module of ``node`` (a node of this graph) from its current parameters, in this network's mode."""
        self.layers[module_key(node.name)] = OPS[node.op](node).train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, torch.Tensor] = {}
        for index, node in enumerate(self.graph.nodes):
            values[node.name] = self.evaluate(node, values, x)
            for name in self._release[index]:
                del values[name]
        return values[self.graph.output]

    def evaluate(self, node: Node, values: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The output of one node from the outputs of its inputs in ``values`` (``x``: the network's input).

        ``forward`` runs every node in order; a caller that keeps ``values`` between
        calls can rerun part of the graph (convert's bias correction does).
        """
        if node.op == "input":
            return x
        if node.op == "add":
            left, right = _broadcast_time([values[i] for i in node.inputs])
            return left + right
        if node.op == "cat":
            return torch.cat(_broadcast_time([values[i] for i in node.inputs]), dim=node.attrs["dim"])
        return self.layers[module_key(node.name)](values[node.inputs[0]])


def count_parameters(graph: Graph) -> int:
    return sum(t.numel() for node in graph.weighted() for t in node.params.values())


def fold_batchnorm(graph: Graph) -> Graph:
    """Fold each BatchNorm into the conv/linear before it, where that layer feeds only the BN.

    With s = γ/√(σ²+ε): W' = s·W (per output channel) and b' = s·(b − μ) + β.
    A BatchNorm that follows anything else stays: it is an affine map, which
    an SNN applies to its input current unchanged.
    """
    graph = graph.copy()
    nodes = list(graph.nodes)
    renamed: dict[str, str] = {}
    kept: list[Node] = []
    for node in nodes:
        node.inputs = tuple(renamed.get(i, i) for i in node.inputs)
        if node.op == "batchnorm":
            producer = graph[node.inputs[0]]
            if producer.op in ("conv", "linear") and len(graph.consumers(producer.name)) == 1:
                p = node.params
                scale = (p["weight"] if "weight" in p else torch.ones_like(p["running_var"])) / torch.sqrt(p["running_var"] + node.attrs["eps"])
                shift = p["bias"] if "bias" in p else torch.zeros_like(p["running_mean"])
                weight = producer.params["weight"]
                bias = producer.params.get("bias", torch.zeros(weight.shape[0]))
                producer.params["weight"] = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
                producer.params["bias"] = (bias - p["running_mean"]) * scale + shift
                producer.attrs["folded_batchnorm"] = node.name
                renamed[node.name] = producer.name
                continue
        kept.append(node)
    output = renamed.get(graph.output, graph.output)
    return Graph(kept, output)
