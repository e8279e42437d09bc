"""Export a ``SpikingModel`` to ONNX, and run an exported model with onnxruntime.

Every ReLU node of the graph becomes an integrate-and-fire (IF) neuron with
soft reset, exactly as ``edgesnn.convert.SpikingNetwork`` simulates it:

    v[t] = v[t−1] + I[t];   s[t] = [v[t] ≥ θ];   v[t] ← v[t] − θ·s[t];   out[t] = a·s[t],

with v[0] = v₀·θ, θ the threshold (per layer or per channel, broadcast over
H×W), v₀ the initial membrane as a fraction of θ and a the spike amplitude
(θ unless ``model.amplitudes`` gives one). The input is a constant current
(direct coding): the same normalised image is fed at every step. The output
layer does not spike; the logits are its input averaged over the T steps.

Two layouts, both one self-contained ``.onnx`` file (weights inside, no
external data) with a dynamic batch dimension:

- stateless, for T = 1: ``images`` (N×C×H×W) → ``logits`` (N×classes). With one
  step there is no state: each neuron computes out = a·[v₀·θ + I ≥ θ], i.e.
  a·[I ≥ θ·(1 − v₀)], written as the simulator writes it so that the two round
  alike.
- step, for T > 1: ``images``, ``membrane.<node>``… → ``logits_step``,
  ``membrane.<node>.next``… — one timestep of the recurrence above. There is
  one membrane per neuron node, float32 N×(that node's output shape). The
  caller starts each membrane at v₀·θ (``initial_state``), feeds the
  ``.next`` outputs back as the next step's membranes, and averages
  ``logits_step`` over the T steps (``run_onnx`` does all three).

The file's ``metadata_props`` hold JSON values that a runtime needs without
edgesnn: ``edgesnn.layout`` ("stateless" or "step"), ``edgesnn.timesteps``,
``edgesnn.initial_membrane`` (v₀), ``edgesnn.thresholds`` (θ per neuron node)
and ``edgesnn.normalize`` ({"mean": [...], "std": [...]} per channel on [0, 1]
pixels, or null).
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from .. import __version__
from ..artifacts import SpikingModel
from ..errors import ExportError
from ..graph import GraphNetwork

OPSET = 18  # ONNX opset of exported models; onnxruntime ≥ 1.14 runs it
IMAGES = "images"
LOGITS = "logits"  # stateless layout: the network's logits
STEP_LOGITS = "logits_step"  # step layout: the output layer's input at one timestep
LAYOUTS = ("stateless", "step")
METADATA_PREFIX = "edgesnn."


def membrane_input(name: str) -> str:
    """Name of the step model's input that carries neuron node ``name``'s membrane potential."""
    return f"membrane.{name}"


def membrane_output(name: str) -> str:
    """Name of the step model's output that carries the membrane after the step."""
    return f"membrane.{name}.next"


def _per_channel(values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """θ (or a) as a float32 tensor that broadcasts against one sample of ``shape``: C×1×1 for C×H×W."""
    values = values.detach().float().clone()
    return values.reshape(()) if values.numel() == 1 else values.reshape(-1, *([1] * (len(shape) - 1)))


class _Fire(nn.Module):
    """A one-step IF neuron, stateless: out = a·[v₀·θ + I ≥ θ] = a·[I ≥ θ·(1 − v₀)]."""

    def __init__(self, threshold: torch.Tensor, initial_membrane: float, amplitude: torch.Tensor):
        super().__init__()
        self.register_buffer("threshold", threshold)
        # v₀·θ rounded as SpikingNetwork rounds its starting membrane.
        self.register_buffer("start", threshold * initial_membrane)
        self.register_buffer("amplitude", amplitude)

    def forward(self, current: torch.Tensor) -> torch.Tensor:
        return self.amplitude * (self.start + current >= self.threshold).to(current.dtype)


class _StepFire(nn.Module):
    """One timestep of an IF neuron with soft reset; the membrane lives in ``membranes``.

    v ← v + I;  s = [v ≥ θ];  v ← v − θ·s;  out = a·s.
    """

    def __init__(self, name: str, threshold: torch.Tensor, amplitude: torch.Tensor, membranes: dict[str, torch.Tensor]):
        super().__init__()
        self.name = name
        self.register_buffer("threshold", threshold)
        self.register_buffer("amplitude", amplitude)
        self.membranes = membranes  # shared with _Step: the membrane before the step in, after it out

    def forward(self, current: torch.Tensor) -> torch.Tensor:
        membrane = self.membranes[self.name] + current
        spikes = (membrane >= self.threshold).to(current.dtype)
        self.membranes[self.name] = membrane - self.threshold * spikes
        return spikes * self.amplitude


class _Stateless(nn.Module):
    """images → logits of the one-step SNN."""

    def __init__(self, model: SpikingModel):
        super().__init__()
        neurons = {}
        for node in model.graph.neurons():
            threshold = _per_channel(model.thresholds[node.name], node.shape)
            neurons[node.name] = _Fire(threshold, model.initial_membrane, _per_channel(model.amplitude(node.name), node.shape))
        self.network = GraphNetwork(model.graph, neurons)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)


class _Step(nn.Module):
    """(images, membranes…) → (output-layer input at this step, membranes after it…)."""

    def __init__(self, model: SpikingModel):
        super().__init__()
        self.names = [node.name for node in model.graph.neurons()]
        self.membranes: dict[str, torch.Tensor] = {}
        neurons = {}
        for node in model.graph.neurons():
            threshold = _per_channel(model.thresholds[node.name], node.shape)
            neurons[node.name] = _StepFire(node.name, threshold, _per_channel(model.amplitude(node.name), node.shape), self.membranes)
        self.network = GraphNetwork(model.graph, neurons)

    def forward(self, images: torch.Tensor, *membranes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.membranes.clear()
        self.membranes.update(zip(self.names, membranes))
        logits = self.network(images)
        after = tuple(self.membranes[name] for name in self.names)
        self.membranes.clear()  # hold no tensors between calls (torch.export flags tensors left on modules)
        return (logits, *after)


def _check(model: SpikingModel, step: bool) -> None:
    """Raise ExportError (one line) where the model cannot be exported as asked."""
    if model.timesteps < 1:
        raise ExportError(f"onnx: the model runs T={model.timesteps} timesteps, expected at least 1")
    if not step and model.timesteps > 1:
        raise ExportError(f"onnx: the model runs T={model.timesteps} timesteps but a stateless export computes T=1 only; export the step function (step=True)")
    if not 0 <= model.initial_membrane < 1:
        raise ExportError(f"onnx: initial membrane {model.initial_membrane} must be in [0, 1) of the threshold")
    graph = model.graph
    if not graph.nodes or graph.input.op != "input":
        raise ExportError("onnx: the graph's first node must be its input")
    if tuple(graph.input.shape) and tuple(graph.input.shape) != tuple(model.input_shape):
        raise ExportError(f"onnx: input node has shape {tuple(graph.input.shape)} but the model expects {tuple(model.input_shape)}")
    neurons = {node.name for node in graph.neurons()}
    for what, given in (("threshold", model.thresholds), ("amplitude", model.amplitudes)):
        strangers = sorted(set(given) - neurons)
        if strangers:
            raise ExportError(f"onnx: {what} given for {strangers[0]!r}, which is not a relu node of the graph")
    for node in graph.neurons():
        if node.name not in model.thresholds:
            raise ExportError(f"onnx: node {node.name!r} (relu) has no threshold")
        channels = node.shape[0] if node.shape else 1
        for what, values in (("threshold", model.thresholds[node.name]), ("amplitude", model.amplitude(node.name))):
            if values.numel() != 1 and (values.dim() != 1 or values.numel() != channels):
                raise ExportError(f"onnx: node {node.name!r} (relu) has a {what} of shape {tuple(values.shape)}, expected () or ({channels},) for output shape {node.shape}")
            if not torch.isfinite(values).all():
                raise ExportError(f"onnx: node {node.name!r} (relu) has a {what} with NaN or Inf")


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep torch.onnx's progress lines and deprecation notices about its own internals off the user's console."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            # Images and membranes share one batch dimension, named once; torch.onnx notes the other names it drops.
            warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
            # The tracer notes each Python branch on a shape; every input and output shares the batch dimension, so none changes with it.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            yield
    finally:
        logger.setLevel(level)


def _export(module: nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str], output_names: list[str]) -> onnx.ModelProto:
    """``module`` as an in-memory ONNX model with a dynamic batch dimension.

    torch.onnx's TorchScript tracer writes these graphs (convolutions, matrix
    products, comparisons, pooling, adds) in a fraction of a second. The dynamo
    exporter, torch's default, writes the same model but costs ~3 s a build
    (importing onnxscript and torch.export, rebuilding its op registry at every
    call, decompositions): it is the fallback where the tracer fails.
    """
    module = module.eval()
    try:
        return _export_traced(module, example, input_names, output_names)
    except Exception:  # noqa: BLE001 — the tracer may fail on graphs the dynamo exporter handles
        return _export_dynamo(module, example, input_names, output_names)


def _export_traced(module: nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str], output_names: list[str]) -> onnx.ModelProto:
    """The TorchScript tracer's export, batch dimension dynamic in every input and output."""
    buffer = io.BytesIO()
    dynamic_axes = {name: {0: "batch"} for name in [*input_names, *output_names]}
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(module, example, buffer, input_names=input_names, output_names=output_names, opset_version=OPSET, dynamo=False, dynamic_axes=dynamic_axes)
    return onnx.load_from_string(buffer.getvalue())


def _export_dynamo(module: nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str], output_names: list[str]) -> onnx.ModelProto:
    """torch.export (the dynamo exporter) into an in-memory ONNX model, batch dimension dynamic."""
    batch = torch.export.Dim("batch")
    dynamic_shapes = tuple({0: batch} for _ in example)
    if len(example) > 1:  # forward(images, *membranes): the varargs are one entry
        dynamic_shapes = (dynamic_shapes[0], dynamic_shapes[1:])
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                module,
                example,
                input_names=input_names,
                output_names=output_names,
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
    except Exception as error:  # torch.onnx raises many types; any of them means "this graph does not export"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(f"onnx: torch.onnx could not export the graph ({first_line})") from error
    return program.model_proto


def _annotate(proto: onnx.ModelProto, model: SpikingModel, layout: str) -> None:
    """Producer, documentation of inputs and outputs, and the metadata a runtime needs."""
    proto.producer_name = "edgesnn"
    proto.producer_version = __version__
    proto.doc_string = (
        "Spiking network exported by edgesnn. IF neurons with soft reset: v += I; s = [v >= theta]; v -= theta*s; out = a*s; "
        + ("one step from v = v0*theta (stateless)." if layout == "stateless" else "one timestep per call; start each membrane at v0*theta, average logits_step over T steps.")
    )
    metadata = {
        "layout": layout,
        "timesteps": model.timesteps,
        "initial_membrane": model.initial_membrane,
        "thresholds": {node.name: model.thresholds[node.name].detach().float().tolist() for node in model.graph.neurons()},
        "normalize": {"mean": list(model.normalize[0]), "std": list(model.normalize[1])} if model.normalize else None,
        "num_classes": model.num_classes,
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, json.dumps(value)
    docs = {IMAGES: "float32 N×C×H×W images, normalised with edgesnn.normalize", LOGITS: "float32 N×classes logits", STEP_LOGITS: "float32 N×classes output-layer input at this step"}
    for node in model.graph.neurons():
        docs[membrane_input(node.name)] = f"membrane potential of {node.name} before the step (start: v0*theta)"
        docs[membrane_output(node.name)] = f"membrane potential of {node.name} after the step"
    for value in [*proto.graph.input, *proto.graph.output]:
        value.doc_string = docs.get(value.name, "")


def onnx_bytes(model: SpikingModel, step: bool | None = None) -> bytes:
    """The SNN as one self-contained ONNX file (opset ``OPSET``, dynamic batch).

    ``step=False`` exports the stateless one-step network, images → logits, in
    which each neuron computes out = a·[v₀·θ + I ≥ θ]. ``step=True`` exports
    one timestep, (images, membrane.<node>…) → (logits_step,
    membrane.<node>.next…), of v ← v + I; s = [v ≥ θ]; v ← v − θ·s; out = a·s.
    The caller initialises each membrane to v₀·θ (``initial_state``), feeds
    the same image at every step, passes the ``.next`` outputs back in and
    averages ``logits_step`` over the T steps; ``run_onnx`` does this.
    ``step=None`` picks the step layout when ``model.timesteps > 1``.

    Raises ExportError where the model cannot be exported (a stateless export
    of a T > 1 model, thresholds that do not match the graph, an op
    torch.onnx cannot translate).
    """
    step = model.timesteps > 1 if step is None else step
    _check(model, step)
    example = torch.zeros(2, *model.input_shape)  # batch 2: a batch of 1 would be specialised to a constant
    if step:
        state = initial_state(model, 2)
        names = [node.name for node in model.graph.neurons()]
        proto = _export(
            _Step(model),
            (example, *(torch.from_numpy(state[membrane_input(name)]) for name in names)),
            [IMAGES, *(membrane_input(name) for name in names)],
            [STEP_LOGITS, *(membrane_output(name) for name in names)],
        )
    else:
        proto = _export(_Stateless(model), (example,), [IMAGES], [LOGITS])
    _annotate(proto, model, "step" if step else "stateless")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ExportError(f"onnx: the exported model fails onnx.checker ({str(error).strip().splitlines()[0]})") from error
    return proto.SerializeToString()


def initial_state(model: SpikingModel, batch: int) -> dict[str, np.ndarray]:
    """The membranes a step model starts from, v(0) = v₀·θ, keyed by input name: float32 batch×(node shape)."""
    state = {}
    for node in model.graph.neurons():
        start = _per_channel(model.thresholds[node.name], node.shape) * model.initial_membrane
        state[membrane_input(node.name)] = np.ascontiguousarray(start.expand(batch, *node.shape).numpy())
    return state


def onnx_metadata(data: bytes) -> dict[str, Any]:
    """The ``edgesnn.*`` metadata of an exported model, JSON-decoded, keys without the prefix."""
    try:
        proto = onnx.load_from_string(data)
    except Exception as error:  # protobuf's DecodeError, or anything onnx raises on garbage
        raise ExportError(f"onnx: not an ONNX model ({type(error).__name__})") from None
    metadata = {}
    for entry in proto.metadata_props:
        if entry.key.startswith(METADATA_PREFIX):
            try:
                metadata[entry.key[len(METADATA_PREFIX) :]] = json.loads(entry.value)
            except json.JSONDecodeError:
                raise ExportError(f"onnx: metadata {entry.key!r} is not JSON") from None
    return metadata


def run_onnx(data: bytes, images: np.ndarray, batch: int = 256, timesteps: int | None = None, threads: int = 1) -> np.ndarray:
    """Logits (N×classes) of an exported model on ``images`` (N×C×H×W, normalised), with onnxruntime on the CPU.

    A stateless model is run once per batch. A step model is run T times per
    batch (T = ``timesteps``, else the exported ``edgesnn.timesteps``) from
    membranes v₀·θ, with the same images at every step, and its
    ``logits_step`` outputs are averaged over the T steps.
    """
    metadata = onnx_metadata(data)
    layout = metadata.get("layout")
    if layout not in LAYOUTS:
        raise ExportError(f"onnx: metadata edgesnn.layout is {layout!r}, expected one of {', '.join(LAYOUTS)}")
    if batch < 1 or threads < 1:
        raise ExportError(f"onnx: batch {batch} and threads {threads} must be at least 1")
    if layout == "stateless" and timesteps not in (None, 1):
        raise ExportError(f"onnx: a stateless model computes T=1 only, asked for T={timesteps}")
    steps = 1 if layout == "stateless" else timesteps if timesteps is not None else metadata.get("timesteps")
    if not isinstance(steps, int) or steps < 1:
        raise ExportError(f"onnx: timesteps {steps!r} must be an integer of at least 1")

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    expected = tuple(inputs[0].shape[1:])
    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ExportError(f"onnx: images have shape {tuple(images.shape)}, the model expects N×{'×'.join(map(str, expected))}")

    # One membrane per neuron node: the input that carries it, the output that
    # replaces it, and v(0) = v₀·θ for one sample, rounded in float32 as the
    # simulator rounds it.
    shapes = {value.name: tuple(value.shape[1:]) for value in inputs[1:]}
    initial_membrane = np.float32(metadata.get("initial_membrane", 0.0))
    membranes: list[tuple[str, str, np.ndarray]] = []
    for name, threshold in metadata.get("thresholds", {}).items() if layout == "step" else ():
        shape = shapes.get(membrane_input(name))
        if shape is None:
            raise ExportError(f"onnx: metadata has a threshold for {name!r} but the model has no input {membrane_input(name)!r}")
        theta = np.asarray(threshold, dtype=np.float32)
        theta = theta.reshape(()) if theta.size == 1 else theta.reshape(-1, *([1] * (len(shape) - 1)))
        membranes.append((membrane_input(name), membrane_output(name), np.broadcast_to(theta * initial_membrane, shape)))
    if len(membranes) != len(shapes):
        raise ExportError(f"onnx: the model has {len(shapes)} membrane inputs but its metadata gives thresholds for {len(membranes)}")
    output_names = [session.get_outputs()[0].name, *(output for _, output, _ in membranes)]

    results = []
    for first in range(0, len(images), batch):
        chunk = images[first : first + batch]
        state = {name: np.ascontiguousarray(np.broadcast_to(start, (len(chunk), *start.shape))) for name, _, start in membranes}
        total = None
        for _ in range(steps):
            logits, *after = session.run(output_names, {IMAGES: chunk, **state})
            total = logits if total is None else total + logits
            state = {name: membrane for (name, _, _), membrane in zip(membranes, after)}
        results.append(total / np.float32(steps))
    if not results:
        return np.zeros((0, session.get_outputs()[0].shape[1]), dtype=np.float32)
    return np.concatenate(results)


__all__ = ["OPSET", "initial_state", "membrane_input", "membrane_output", "onnx_bytes", "onnx_metadata", "run_onnx"]
