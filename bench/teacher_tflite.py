"""The fp32 teacher as a TFLite model, float32 or full-integer int8: the export benchmark's baseline.

    .venv/bin/python bench/teacher_tflite.py     # self-check on both zoo teachers, full Fashion-MNIST test set

``teacher_tflite_bytes(teacher, mode, calibration)`` writes the teacher
(BatchNorm folded) with the flatbuffer helpers of ``export/to_tflite.py``,
from the schema that ships with ai_edge_litert; TensorFlow is not needed.

- ``"float"``: float32 weights, biases and activations.
- ``"int8"``: standard full-integer post-training quantization. Every
  activation is int8 with one scale and zero point, from the min/max (widened
  to hold 0) of its float value over the ``calibration`` images; weights are
  int8, symmetric, one scale per output channel (max|w|/127); biases are int32
  at input scale × weight scale. The model's input and output stay float32:
  QUANTIZE and DEQUANTIZE are inside it, so one runner feeds both modes.

Both modes take images ``images``: float32 N×H×W×C normalised as the teacher
expects (``run_tflite`` transposes N×C×H×W), and give float32 ``logits``
N×classes. A ReLU is fused into the conv, linear, pooling or add before it.
The op forms are those the SNN's TFLite file uses, so that the two files
differ in number formats rather than in op choice (and ``OP_VERSIONS`` of
``to_tflite`` covers them):

- conv: CONV_2D (weights O×kh×kw×I); PyTorch's padding as TFLite's SAME where
  that places the windows alike, else an explicit PAD.
- linear: CONV_2D whose VALID kernel covers the map it reads. A flatten is no
  op: the linear weights O×(C·H·W) are read as O×C×H×W, which puts the
  columns in the NHWC order of the map.
- avgpool, adaptive_avgpool, global_mean: DEPTHWISE_CONV_2D whose weights
  are all 1/(kh·kw) (in int8 one code, 127, at scale 1/(127·kh·kw): exact).
- maxpool: MAX_POOL_2D, unpadded or where SAME places the windows alike.
- add: ADD. The logits: RESHAPE to N×classes (int8: then DEQUANTIZE).

Any other op, and a ReLU that cannot be fused, is refused naming the node.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from edgesnn.artifacts import Teacher
from edgesnn.errors import ExportError
from edgesnn.export.to_tflite import IMAGES, LOGITS, _Graph, _same_padding
from edgesnn.graph import Graph, GraphNetwork, Node, fold_batchnorm, module_key

MODES = ("float", "int8")
INT8_MIN, INT8_MAX = -128, 127
CALIBRATION_BATCH = 256  # images per PyTorch forward pass while calibrating

Range = tuple[float, float]  # min and max of a node's float value over the calibration images


def activation_ranges(graph: Graph, calibration: np.ndarray) -> dict[str, Range]:
    """Min and max of every node's output over the calibration images (run in PyTorch, float32)."""
    network = GraphNetwork(graph).eval()
    ranges: dict[str, Range] = {}
    with torch.no_grad():
        for first in range(0, len(calibration), CALIBRATION_BATCH):
            values: dict[str, torch.Tensor] = {}
            for node in graph.nodes:
                if node.op == "input":
                    value = torch.from_numpy(np.ascontiguousarray(calibration[first : first + CALIBRATION_BATCH]))
                elif node.op == "add":
                    value = values[node.inputs[0]] + values[node.inputs[1]]
                elif node.op == "cat":
                    value = torch.cat([values[name] for name in node.inputs], dim=node.attrs["dim"])
                else:
                    value = network.layers[module_key(node.name)](values[node.inputs[0]])
                values[node.name] = value
                low, high = ranges.get(node.name, (np.inf, -np.inf))
                ranges[node.name] = (min(low, float(value.min())), max(high, float(value.max())))
    return ranges


def int8_parameters(value_range: Range) -> tuple[float, int]:
    """Scale and zero point of an int8 tensor covering ``value_range`` and 0 (TFLite's asymmetric scheme)."""
    low, high = min(value_range[0], 0.0), max(value_range[1], 0.0)
    scale = float(np.float32(max(high - low, 1e-8) / (INT8_MAX - INT8_MIN)))
    zero_point = int(np.clip(round(INT8_MIN - low / scale), INT8_MIN, INT8_MAX))
    return scale, zero_point


class _TeacherWriter:
    """Writes the TFLite ops of one folded teacher graph; ``EMITTERS`` holds one function per graph op."""

    def __init__(self, graph: Graph, mode: str, ranges: dict[str, Range] | None):
        self.source = graph
        self.mode = mode
        self.ranges = ranges  # int8 only
        self.graph = _Graph(1.0)  # the shared int16 scale of the SNN's writer is not used here
        self.value: dict[str, int] = {}  # graph node -> its TFLite tensor, 1×H×W×C (a vector of n: 1×1×1×n)
        self.node: Node | None = None  # the node being written, for messages

    def error(self, message: str) -> ExportError:
        where = f"node {self.node.name!r} ({self.node.op}): " if self.node is not None else ""
        return ExportError(f"teacher tflite: {where}{message}")

    @property
    def int8(self) -> bool:
        return self.mode == "int8"

    # -- tensors -----------------------------------------------------------

    def activation(self, name: str, shape, quantization: tuple[float, int] | None = None) -> int:
        """A 1×H×W×C activation (the batch resizes): float32, or int8 at ``quantization`` (scale, zero point)."""
        if not self.int8:
            return self.graph.tensor(name, (1, *shape), "float32")
        scale, zero_point = quantization
        tensor = self.graph.tensor(name, (1, *shape), "int8", scale)
        self.graph.tensors[tensor].quantization.zeroPoint = [zero_point]
        return tensor

    def calibrated(self, node: str) -> tuple[float, int] | None:
        """The int8 scale and zero point of a node's value (None in float mode)."""
        return int8_parameters(self.ranges[node]) if self.int8 else None

    def quantization(self, tensor: int) -> tuple[float, int] | None:
        if not self.int8:
            return None
        parameters = self.graph.tensors[tensor].quantization
        return parameters.scale[0], parameters.zeroPoint[0]

    # -- ops ---------------------------------------------------------------

    def fused_relu(self, node: Node):
        """The ReLU fused into ``node`` (its only consumer): (relu node, TFLite activation), or (None, NONE)."""
        activations = self.graph.schema.ActivationFunctionType
        consumers = self.source.consumers(node.name)
        if node.name != self.source.output and len(consumers) == 1 and consumers[0].op == "relu":
            ceiling = consumers[0].attrs.get("ceiling")
            if ceiling is None:
                return consumers[0], activations.RELU
            if ceiling == 6:
                return consumers[0], activations.RELU6
        return None, activations.NONE

    def padded(self, tensor: int, padding, kernel, stride, name: str) -> tuple[int, int]:
        """(input, TFLite padding) that place the windows as PyTorch's zero ``padding`` does."""
        schema = self.graph.schema
        if not any(padding):
            return tensor, schema.Padding.VALID
        height, width, channels = self.graph.shape(tensor)
        if _same_padding((height, width), kernel, stride, padding):
            return tensor, schema.Padding.SAME
        top, left = padding
        paddings = self.graph.constant("paddings", [[0, 0], [top, top], [left, left], [0, 0]], "int32")
        out = self.activation(f"{name}/padded", (height + 2 * top, width + 2 * left, channels), self.quantization(tensor))  # int8 pads with the zero point
        self.graph.operator("PAD", [tensor, paddings], [out])
        return out, schema.Padding.VALID

    def weighted(self, kind: str, node: Node, source: int, weight: np.ndarray, bias: np.ndarray, stride, padding, dilation=(1, 1)) -> None:
        """CONV_2D (weight O×I×kh×kw) or DEPTHWISE_CONV_2D (weight C×kh×kw) of ``source``, with the ReLU after it fused.

        int8: codes q_c = round(w_c/s_c), s_c = max|w_c|/127; bias round(b_c/(s_in·s_c)) in int32.
        """
        schema = self.graph.schema
        relu, activation = self.fused_relu(node)
        out_node = relu or node
        weight, bias = np.asarray(weight, dtype=np.float64), np.asarray(bias, dtype=np.float64)
        channels = weight.shape[0]
        kernel = tuple(int(k) for k in weight.shape[-2:])
        reach = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation))  # the window a dilated kernel covers
        source, tflite_padding = self.padded(source, padding, reach, stride, node.name)
        height, width, _ = self.graph.shape(source)
        if tflite_padding == schema.Padding.SAME:
            windows = (-(-height // stride[0]), -(-width // stride[1]))
        else:
            windows = ((height - reach[0]) // stride[0] + 1, (width - reach[1]) // stride[1] + 1)
        if kind == "CONV_2D":
            filters, axis, options = np.transpose(weight, (0, 2, 3, 1)), 0, schema.Conv2DOptionsT()  # O, kh, kw, I
        else:
            filters, axis, options = np.transpose(weight, (1, 2, 0))[None], 3, schema.DepthwiseConv2DOptionsT()  # 1, kh, kw, C
            options.depthMultiplier = 1
        options.padding, options.strideH, options.strideW = tflite_padding, int(stride[0]), int(stride[1])
        options.dilationHFactor, options.dilationWFactor = int(dilation[0]), int(dilation[1])
        options.fusedActivationFunction = activation
        if self.int8:
            largest = np.abs(weight.reshape(channels, -1)).max(1)
            weight_scale = np.where(largest > 0, largest / INT8_MAX, 1.0).astype(np.float32)
            spread = [1] * filters.ndim
            spread[axis] = -1
            codes = np.clip(np.round(filters / weight_scale.reshape(spread)), -INT8_MAX, INT8_MAX)
            bias_scale = np.float32(self.quantization(source)[0]) * weight_scale  # float32, as the kernel checks it
            weights = self.graph.tensor(f"{node.name}/weights", filters.shape, "int8", weight_scale, axis, codes)
            biases = self.graph.tensor(f"{node.name}/bias", (channels,), "int32", bias_scale, 0, np.round(bias / bias_scale.astype(np.float64)))
        else:
            weights = self.graph.tensor(f"{node.name}/weights", filters.shape, "float32", data=filters)
            biases = self.graph.tensor(f"{node.name}/bias", (channels,), "float32", data=bias)
        out = self.activation(out_node.name, (*windows, channels), self.calibrated(out_node.name))
        self.graph.operator(kind, [source, weights, biases], [out], options)
        self.value[node.name] = self.value[out_node.name] = out

    def mean_pool(self, node: Node, kernel, stride, padding=(0, 0)) -> None:
        """Average over windows: a DEPTHWISE_CONV_2D whose weights are all 1/(kh·kw)."""
        source = self.value[node.inputs[0]]
        channels = self.graph.shape(source)[2]
        weight = np.full((channels, *kernel), 1.0 / (kernel[0] * kernel[1]))
        self.weighted("DEPTHWISE_CONV_2D", node, source, weight, np.zeros(channels), stride, padding)

    def logits(self, tensor: int) -> int:
        """N×1×1×classes -> float32 N×classes."""
        height, width, classes = self.graph.shape(tensor)
        if height * width != 1:
            raise self.error(f"the output is a {classes}×{height}×{width} map, expected a vector of logits")
        shape = self.graph.constant("logits_shape", [-1, classes], "int32")
        options = self.graph.schema.ReshapeOptionsT()
        options.newShape = [-1, classes]
        name = f"{LOGITS}/int8" if self.int8 else LOGITS
        flat = self.graph.tensor(name, (1, classes), "int8" if self.int8 else "float32", self.quantization(tensor)[0] if self.int8 else None)
        if self.int8:
            self.graph.tensors[flat].quantization.zeroPoint = [self.quantization(tensor)[1]]  # RESHAPE keeps the quantization
        self.graph.operator("RESHAPE", [tensor, shape], [flat], options)
        if not self.int8:
            return flat
        out = self.graph.tensor(LOGITS, (1, classes), "float32")
        self.graph.operator("DEQUANTIZE", [flat], [out])
        return out


# -- emitters: one per graph op ---------------------------------------------


def _emit_conv(writer: _TeacherWriter, node: Node) -> None:
    weight = node.params["weight"].double().numpy()
    bias = node.params["bias"].double().numpy() if "bias" in node.params else np.zeros(len(weight))
    groups = node.attrs["groups"]
    source = writer.value[node.inputs[0]]
    channels = writer.graph.shape(source)[2]
    if groups == 1:
        writer.weighted("CONV_2D", node, source, weight, bias, node.attrs["stride"], node.attrs["padding"], node.attrs["dilation"])
    elif groups == channels == len(weight) and weight.shape[1] == 1:
        writer.weighted("DEPTHWISE_CONV_2D", node, source, weight[:, 0], bias, node.attrs["stride"], node.attrs["padding"], node.attrs["dilation"])
    else:
        raise writer.error(f"a grouped convolution ({groups} groups over {channels} channels) has no TFLite form here; expected 1 group or depthwise")


def _emit_linear(writer: _TeacherWriter, node: Node) -> None:
    source = writer.value[node.inputs[0]]
    height, width, channels = writer.graph.shape(source)
    weight = node.params["weight"].double().numpy()
    if weight.shape[1] != channels * height * width:
        raise writer.error(f"reads {weight.shape[1]} features from a {channels}×{height}×{width} map")
    bias = node.params["bias"].double().numpy() if "bias" in node.params else np.zeros(len(weight))
    # PyTorch's flatten is C, H, W: the columns read as O×C×H×W form a VALID kernel over the whole map.
    writer.weighted("CONV_2D", node, source, weight.reshape(len(weight), channels, height, width), bias, (1, 1), (0, 0))


def _emit_relu(writer: _TeacherWriter, node: Node) -> None:
    if node.name not in writer.value:  # written by its producer, fused
        producer = writer.source[node.inputs[0]]
        raise writer.error(
            f"follows {producer.name!r} ({producer.op}) with ceiling {node.attrs.get('ceiling')}; only a ReLU or ReLU6 that is the sole reader of a conv, linear, pooling or add is exported (fused)"
        )


def _emit_avgpool(writer: _TeacherWriter, node: Node) -> None:
    attrs = node.attrs
    if attrs["ceil_mode"] or (any(attrs["padding"]) and not attrs["count_include_pad"]):
        raise writer.error("an average pooling with ceil_mode or count_include_pad=False has no TFLite form here")
    writer.mean_pool(node, attrs["kernel"], attrs["stride"], attrs["padding"])


def _emit_adaptive_avgpool(writer: _TeacherWriter, node: Node) -> None:
    height, width, _ = writer.graph.shape(writer.value[node.inputs[0]])
    size = node.attrs["output_size"]
    size = (size, size) if isinstance(size, int) else tuple(height if s is None else s for s in size)
    if height % size[0] or width % size[1]:
        raise writer.error(f"adaptive pooling of {height}×{width} to {size[0]}×{size[1]}: windows of unequal size have no TFLite form here")
    window = (height // size[0], width // size[1])
    writer.mean_pool(node, window, window)


def _emit_global_mean(writer: _TeacherWriter, node: Node) -> None:
    height, width, _ = writer.graph.shape(writer.value[node.inputs[0]])
    writer.mean_pool(node, (height, width), (height, width))


def _emit_maxpool(writer: _TeacherWriter, node: Node) -> None:
    attrs = node.attrs
    source = writer.value[node.inputs[0]]
    height, width, channels = writer.graph.shape(source)
    kernel, stride = attrs["kernel"], attrs["stride"]
    schema = writer.graph.schema
    if attrs["ceil_mode"] or tuple(attrs["dilation"]) != (1, 1):
        raise writer.error("a max pooling with ceil_mode or dilation has no TFLite form here")
    if not any(attrs["padding"]):
        padding, windows = schema.Padding.VALID, ((height - kernel[0]) // stride[0] + 1, (width - kernel[1]) // stride[1] + 1)
    elif _same_padding((height, width), kernel, stride, attrs["padding"]):
        padding, windows = schema.Padding.SAME, (-(-height // stride[0]), -(-width // stride[1]))  # SAME skips the padded cells, as PyTorch's −∞ does
    else:
        raise writer.error(f"padding {attrs['padding']} places the windows where TFLite's SAME does not")
    options = schema.Pool2DOptionsT()
    options.padding, options.strideH, options.strideW = padding, int(stride[0]), int(stride[1])
    options.filterHeight, options.filterWidth = int(kernel[0]), int(kernel[1])
    out = writer.activation(node.name, (*windows, channels), writer.quantization(source))  # int8: the input's scale, as the kernel requires
    writer.graph.operator("MAX_POOL_2D", [source], [out], options)
    writer.value[node.name] = out


def _emit_add(writer: _TeacherWriter, node: Node) -> None:
    left, right = (writer.value[name] for name in node.inputs)
    if writer.graph.shape(left) != writer.graph.shape(right):
        raise writer.error(f"adds {writer.graph.shape(left)} to {writer.graph.shape(right)} (H×W×C); broadcasting is not exported")
    relu, activation = writer.fused_relu(node)
    out_node = relu or node
    options = writer.graph.schema.AddOptionsT()
    options.fusedActivationFunction = activation
    out = writer.activation(out_node.name, writer.graph.shape(left), writer.calibrated(out_node.name))
    writer.graph.operator("ADD", [left, right], [out], options)
    writer.value[node.name] = writer.value[out_node.name] = out


def _emit_reshape(writer: _TeacherWriter, node: Node) -> None:
    height, width, channels = writer.graph.shape(writer.value[node.inputs[0]])
    if len(node.shape) != 1 or node.shape[0] != channels * height * width:
        raise writer.error(f"reshape to {node.shape}: only a flatten (to {channels * height * width} features) is exported")
    writer.value[node.name] = writer.value[node.inputs[0]]  # read by a linear layer as a map (see _emit_linear)


def _emit_identity(writer: _TeacherWriter, node: Node) -> None:
    writer.value[node.name] = writer.value[node.inputs[0]]


EMITTERS: dict[str, Callable[[_TeacherWriter, Node], None]] = {
    "conv": _emit_conv,
    "linear": _emit_linear,
    "relu": _emit_relu,
    "avgpool": _emit_avgpool,
    "maxpool": _emit_maxpool,
    "adaptive_avgpool": _emit_adaptive_avgpool,
    "global_mean": _emit_global_mean,
    "add": _emit_add,
    "reshape": _emit_reshape,
    "identity": _emit_identity,
}


def teacher_tflite_bytes(teacher: Teacher, mode: str, calibration: np.ndarray | None = None) -> bytes:
    """The teacher (BatchNorm folded) as a TFLite model: ``mode`` "float" (float32) or "int8" (full-integer).

    ``calibration``: float32 N×C×H×W images, normalised as the teacher
    expects, whose activation ranges set the int8 scales (needed for "int8").
    Input ``images`` float32 1×H×W×C (the batch resizes), output ``logits``
    float32 1×classes.
    """
    if mode not in MODES:
        raise ExportError(f"teacher tflite: mode {mode!r}; expected one of {', '.join(MODES)}")
    graph = fold_batchnorm(teacher.graph)
    ranges = None
    if mode == "int8":
        if calibration is None:
            raise ExportError("teacher tflite: int8 needs calibration images")
        calibration = np.asarray(calibration, dtype=np.float32)
        if calibration.ndim != 4 or tuple(calibration.shape[1:]) != tuple(teacher.input_shape) or len(calibration) == 0:
            raise ExportError(f"teacher tflite: calibration images must be N×{'×'.join(map(str, teacher.input_shape))}, got shape {calibration.shape}")
        if not np.isfinite(calibration).all():
            raise ExportError("teacher tflite: calibration images contain NaN or Inf")
        ranges = activation_ranges(graph, calibration)
    writer = _TeacherWriter(graph, mode, ranges)
    channels, height, width = teacher.input_shape
    images = writer.graph.tensor(IMAGES, (1, height, width, channels), "float32")
    writer.graph.tensors[images].shapeSignature = [-1, height, width, channels]
    if writer.int8:
        writer.value[graph.input.name] = writer.activation(f"{IMAGES}/int8", (height, width, channels), writer.calibrated(graph.input.name))
        writer.graph.operator("QUANTIZE", [images], [writer.value[graph.input.name]])
    else:
        writer.value[graph.input.name] = images
    for node in graph.nodes[1:]:
        emitter = EMITTERS.get(node.op)
        writer.node = node
        if emitter is None:
            reason = "a BatchNorm that could not be folded into a conv or linear" if node.op == "batchnorm" else f"op {node.op!r}"
            raise writer.error(f"{reason} has no TFLite form here; known ops: {', '.join(EMITTERS)}")
        if node.params and any(not torch.isfinite(tensor).all() for tensor in node.params.values() if tensor.is_floating_point()):
            raise writer.error("a parameter contains NaN or Inf")
        emitter(writer, node)
    writer.node = graph[graph.output]
    logits = writer.logits(writer.value[graph.output])
    description = f"edgesnn teacher baseline ({'float32' if mode == 'float' else 'full-integer int8'}) of {teacher.source}"
    return writer.graph.serialize([images], [logits], description)


# ---------------------------------------------------------------------------
# Self-check


def _latency_ms(data: bytes, images: np.ndarray, batch: int, count: int) -> float:
    """Mean milliseconds per image in the LiteRT interpreter, 1 thread, after a warm-up batch."""
    from edgesnn.export.to_tflite import run_tflite

    run_tflite(data, images[:batch], batch=batch)
    count = min(count, len(images)) // batch * batch
    started = time.perf_counter()
    run_tflite(data, images[:count], batch=batch)
    return 1000 * (time.perf_counter() - started) / count


def main() -> None:
    from edgesnn.datasets import load_labelled_images
    from edgesnn.export import images_from_pixels, pixels_from_images
    from edgesnn.export.to_tflite import run_tflite
    from edgesnn.pipeline import load_teacher

    data = "/usr/share/datasets/fashion-mnist"
    torch.set_num_threads(1)
    test = load_labelled_images(data, "test", None, 10000)
    # The teacher is a baseline, not the model under test: its int8 calibration may use real training images.
    train = load_labelled_images(data, "train", None, 512)
    labels = torch.from_numpy(test.labels)
    print("| teacher | runtime | bytes | accuracy | = PyTorch | max abs Δlogit | ms/image b=1 | b=64 |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("fmnist_resnet8", "fmnist_vgg"):
        teacher = load_teacher(name)
        images = images_from_pixels(pixels_from_images(torch.from_numpy(test.images), None), teacher.normalize)
        calibration = images_from_pixels(pixels_from_images(torch.from_numpy(train.images), None), teacher.normalize).numpy()
        with torch.no_grad():
            network = teacher.network
            reference = torch.cat([network(images[i : i + 1000]) for i in range(0, len(images), 1000)]).double()
        predictions = reference.argmax(1)
        print(f"| {name} | PyTorch | | {100 * float((predictions == labels).double().mean()):.2f} | | | | |")
        for mode in MODES:
            model = teacher_tflite_bytes(teacher, mode, calibration)
            logits = torch.from_numpy(run_tflite(model, images.numpy(), batch=256))
            found = logits.argmax(1)
            print(
                f"| {name} | TFLite {mode} | {len(model):,} | {100 * float((found == labels).double().mean()):.2f} | {100 * float((found == predictions).double().mean()):.2f}% "
                f"| {float((logits - reference).abs().max()):.3g} | {_latency_ms(model, images.numpy(), 1, 1000):.4f} | {_latency_ms(model, images.numpy(), 64, 2048):.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
