"""TFLite flatbuffer of an integer program, and the interpreter that checks it.

``tflite_bytes(program, stamp)`` writes the program as a quantized TFLite
model with the flatbuffer schema shipped in ``ai_edge_litert`` (no
TensorFlow). It is a 16x8 model: int16 activations, int8 weights, int64
biases, so the image keeps the program's int16 levels. Layout:

- input ``images``: float32 N×H×W×C (TFLite's channels-last), normalised as
  the model expects; QUANTIZE turns it into the program's int16 image
  q = round(x / s) with s = ``program.input_scale`` (the same levels as
  ``program.input_table``, up to float32 rounding of the normalisation);
- output ``logits``: float32 N×classes (DEQUANTIZE of int16 logits whose
  scale is given in the file).

Every int16 tensor carries the one scale s and zero point 0, so a
convolution's requantization multiplier s·w_c/s is its weight scale w_c,
which is chosen as an integer or a power of two times a 15-bit mantissa:
TFLite's 16x8 kernels then compute y = ⌊(acc + b_c)·w_c + ½⌋ exactly, with
acc the integer sum of int8 codes times int16 inputs and b_c the int64 bias.
The program's ops become:

- conv + fire (spike = [acc ≥ θ]): CONV_2D with w_c = 1, bias 1 − θ and a
  fused RELU, then MINIMUM with 1, so y = min(max(acc + 1 − θ, 0), 1). Exact
  (saturation at int16 keeps the sign).
- conv without fire: an accumulator, emitted where it is read, with the gain
  and bias that reader needs (below); a linear layer is a CONV_2D whose VALID
  kernel covers the map. Binary layers are stored as int8 ±1: TFLite has no
  1-bit weights.
- fire on an accumulator: as conv + fire; through a max pooling too (MAX_POOL_2D
  commutes with the monotone map).
- avgpool (window sums): DEPTHWISE_CONV_2D with an all-ones kernel, exact.
- maxpool, pad, slice, cat: MAX_POOL_2D, PAD, STRIDED_SLICE, CONCATENATION
  (SAME padding where it equals PyTorch's, an explicit PAD with zeros else).
- add_fire (Σ m_t·x_t ≥ θ in 64 bits): each term becomes int16 in a common
  unit per channel, the terms meet in ADDs (equal scales: an exact saturating
  sum) and the last ADD's fused RELU with MINIMUM 1 gives the spike. One
  accumulator a plus one 0/1 spike map x is exact:
  a ≥ A(x) = ⌈(θ − m_x·x)/m_a⌉ is written a + 1 − A(0) + (A(0) − A(1))·x ≥ 1.
  Any other mix is rounded: the unit is m_a/2^k for the largest
  accumulator a, with k as large as keeps the other terms within 2^14 units,
  each other term is ⌊m_t·x_t/unit + ½⌋ (gain rounded to 15 bits) and the
  threshold's remainder is one more ADD of a constant; a spike can differ
  from the reference only where Σ m_t·x_t lies within about one unit per
  term of θ.
- output (int64 logits x·multiplier + offset): CONV_2D to int16 logits
  ⌊(acc + ⌊offset/multiplier⌉)·multiplier/D + ½⌋ with D the largest possible
  |logit| / 32767, then RESHAPE and DEQUANTIZE. This is the one rounding every
  model has: two classes whose logits differ by less than about D may swap.
- an average pooling of an accumulator (not produced by ``lower`` for the zoo
  models) sums a power-of-two requantization of it, which rounds.

``run_tflite(data, images)`` runs the file with ``ai_edge_litert``'s
interpreter (``tflite_runtime`` where that is missing) on N×C×H×W float32
images and returns float32 logits.
"""

from __future__ import annotations

import math
from typing import Callable

import flatbuffers
import numpy as np

from edgesnn.errors import ExportError

from .program import Op, Program, TensorSpec

IMAGES = "images"
LOGITS = "logits"
INT16_MAX = 32767
INT32_MAX = 2**31 - 1
GAIN_BITS = 15  # TFLite's 16x8 kernels keep 15 bits of a requantization multiplier
MAX_GAIN = 2**13  # a requantization multiplier must stay below 2^14 (the kernels shift right by 14 − log2 of it)
TERM_UNITS = 2**14 - 1  # the terms of an add besides its anchor stay within this many units
TFLITE_SCHEMA_VERSION = 3

# The builtin ops an exported model contains, with the version of each that has the int16 kernels.
OP_VERSIONS = {
    "CONV_2D": 4,
    "DEPTHWISE_CONV_2D": 5,
    "ADD": 4,
    "MINIMUM": 4,
    "MAX_POOL_2D": 3,
    "PAD": 4,
    "STRIDED_SLICE": 5,
    "CONCATENATION": 3,
    "RESHAPE": 1,
    "QUANTIZE": 1,
    "DEQUANTIZE": 4,
    "CAST": 1,
}


def _schema():
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        raise ExportError("export tflite: writing a TFLite file needs the ai-edge-litert package (pip install ai-edge-litert)") from None
    return schema


# ---------------------------------------------------------------------------
# Flatbuffer


class _Graph:
    """The TFLite subgraph under construction: tensors, constant buffers and operators."""

    def __init__(self, scale: float):
        self.schema = _schema()
        self.scale = float(np.float32(scale))  # of every int16 activation
        self.tensors: list = []
        self.buffers: list[np.ndarray | None] = [None]  # buffer 0 is the empty one every tensor without data points at
        self.operators: list = []
        self.opcodes: dict[str, int] = {}
        self.constants: dict[tuple, int] = {}

    def tensor(self, name: str, shape, dtype: str, scale=None, axis: int = 0, data: np.ndarray | None = None) -> int:
        schema = self.schema
        tensor = schema.TensorT()
        tensor.name = name
        tensor.shape = [int(v) for v in shape]
        tensor.type = getattr(schema.TensorType, dtype.upper())
        if scale is not None:
            scales = np.atleast_1d(np.asarray(scale, dtype=np.float32))
            quantization = schema.QuantizationParametersT()
            quantization.scale = [float(v) for v in scales]
            quantization.zeroPoint = [0] * len(scales)
            quantization.quantizedDimension = axis
            tensor.quantization = quantization
        if data is not None:
            tensor.buffer = len(self.buffers)
            self.buffers.append(np.ascontiguousarray(data, dtype=np.dtype(dtype).newbyteorder("<")))
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    def activation(self, name: str, shape, scale: float | None = None) -> int:
        """An int16 activation N×H×W×C at the shared scale (or ``scale``)."""
        return self.tensor(name, (1, *shape), "int16", self.scale if scale is None else scale)

    def constant(self, name: str, values: np.ndarray, dtype: str, scale=None, axis: int = 0) -> int:
        values = np.asarray(values)
        key = (dtype, values.shape, values.astype(dtype).tobytes(), None if scale is None else np.asarray(scale, dtype=np.float32).tobytes(), axis)
        if key not in self.constants:  # small constants (the 1 of every MINIMUM) are shared
            self.constants[key] = self.tensor(name, values.shape, dtype, scale, axis, values.astype(dtype))
        return self.constants[key]

    def operator(self, kind: str, inputs: list[int], outputs: list[int], options=None) -> None:
        schema = self.schema
        if kind not in self.opcodes:
            self.opcodes[kind] = len(self.opcodes)
        operator = schema.OperatorT()
        operator.opcodeIndex = self.opcodes[kind]
        operator.inputs = inputs
        operator.outputs = outputs
        if options is not None:
            operator.builtinOptionsType = getattr(schema.BuiltinOptions, type(options).__name__[:-1])
            operator.builtinOptions = options
        self.operators.append(operator)

    def shape(self, tensor: int) -> tuple[int, ...]:
        return tuple(self.tensors[tensor].shape[1:])

    def serialize(self, inputs: list[int], outputs: list[int], description: str) -> bytes:
        schema = self.schema
        subgraph = schema.SubGraphT()
        subgraph.tensors, subgraph.inputs, subgraph.outputs, subgraph.operators = self.tensors, inputs, outputs, self.operators
        subgraph.name = "main"
        model = schema.ModelT()
        model.version = TFLITE_SCHEMA_VERSION
        model.description = description
        model.subgraphs = [subgraph]
        codes = []
        for kind in self.opcodes:
            code = schema.OperatorCodeT()
            code.builtinCode = getattr(schema.BuiltinOperator, kind)
            code.deprecatedBuiltinCode = min(code.builtinCode, schema.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
            code.version = OP_VERSIONS[kind]
            codes.append(code)
        model.operatorCodes = codes
        model.buffers = [_AlignedBuffer(data) for data in self.buffers]
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


class _AlignedBuffer:
    """A constant buffer whose bytes start on a 16-byte boundary (int64 biases are read in place)."""

    def __init__(self, data: np.ndarray | None):
        self.data = data

    def Pack(self, builder: flatbuffers.Builder) -> int:  # noqa: N802 (the schema's naming)
        schema = _schema()
        vector = None
        if self.data is not None and self.data.size:
            payload = self.data.tobytes()
            builder.StartVector(1, len(payload), 16)
            builder.head = builder.head - len(payload)
            builder.Bytes[builder.head : builder.head + len(payload)] = payload
            vector = builder.EndVector(len(payload))
        schema.BufferStart(builder)
        if vector is not None:
            schema.BufferAddData(builder, vector)
        return schema.BufferEnd(builder)


# ---------------------------------------------------------------------------
# Arithmetic


def representable_gain(gain: np.ndarray) -> np.ndarray:
    """Each positive gain rounded to 15 significant bits: TFLite's 16x8 requantization applies it exactly."""
    gain = np.asarray(gain, dtype=np.float64)
    mantissa, exponent = np.frexp(gain)
    return np.ldexp(np.round(mantissa * 2**GAIN_BITS) / 2**GAIN_BITS, exponent)


def requantize(acc: np.ndarray, bias: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """What a 16x8 kernel writes for an int64 accumulator: sat16(⌊(acc + bias)·gain + ½⌋), per channel (last axis)."""
    value = np.floor((np.asarray(acc, dtype=np.float64) + bias) * gain + 0.5)
    return np.clip(value, -INT16_MAX - 1, INT16_MAX).astype(np.int64)


def _ceil_div(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return -((-np.asarray(numerator, dtype=np.int64)) // np.asarray(denominator, dtype=np.int64))


def _power_of_two_at_most(value: float) -> float:
    return 2.0 ** math.floor(math.log2(value))


def _same_padding(size: tuple[int, int], kernel, stride, padding) -> bool:
    """Whether TFLite's SAME padding places the windows where PyTorch's symmetric ``padding`` does."""
    for extent, k, s, p in zip(size, kernel, stride, padding):
        out = (extent + 2 * p - k) // s + 1
        same_out = -(-extent // s)
        total = max((same_out - 1) * s + k - extent, 0)
        if out != same_out or total // 2 != p:
            return False
    return True


# ---------------------------------------------------------------------------
# Program -> graph


class _Writer:
    """Emits the TFLite ops of a program, one program op at a time (see ``EMITTERS``)."""

    def __init__(self, program: Program):
        self.program = program
        self.graph = _Graph(program.input_scale)
        self.value: dict[str, int] = {}  # program tensor -> TFLite int16 tensor holding its exact integers
        self.specs: dict[str, TensorSpec] = dict(program.tensors)  # the program's, plus the accumulators of conv + fire
        self.producer: dict[str, Op] = {op.output: op for op in program.ops}
        self.count = 0  # names the intermediate tensors
        self.logits: int | None = None
        self.op: Op | None = None  # the program op being emitted, for messages

    def error(self, message: str) -> ExportError:
        op = self.op
        where = f"op {op.kind!r} of node {op.source!r}: " if op is not None else ""
        return ExportError(f"export tflite: {where}{message}")

    def spec(self, name: str) -> TensorSpec:
        return self.specs[name]

    def label(self, name: str, what: str) -> str:
        self.count += 1
        return f"{name}/{what}{self.count}"

    def exact(self, name: str) -> int:
        """The TFLite tensor of an exactly held program tensor (the image, spike maps and their sums)."""
        if name not in self.value:
            raise self.error(f"reads {name!r}, a {self.spec(name).kind} accumulator, where an exact int16 tensor is needed")
        return self.value[name]

    # -- building blocks ---------------------------------------------------

    def padded(self, tensor: int, padding, kernel, stride, name: str) -> tuple[int, int]:
        """(input, TFLite padding) placing the windows as PyTorch's zero ``padding`` does."""
        schema = self.graph.schema
        if not any(padding):
            return tensor, schema.Padding.VALID
        height, width, channels = self.graph.shape(tensor)
        if _same_padding((height, width), kernel, stride, padding):
            return tensor, schema.Padding.SAME
        top, left = padding
        paddings = self.graph.constant(f"{name}/paddings", np.array([[0, 0], [top, top], [left, left], [0, 0]]), "int32")
        out = self.graph.activation(f"{name}/padded", (height + 2 * top, width + 2 * left, channels))
        self.graph.operator("PAD", [tensor, paddings], [out])
        return out, schema.Padding.VALID

    def weighted(self, kind: str, name: str, source: int, codes: np.ndarray, gain: np.ndarray, bias: np.ndarray, stride, padding, relu: bool, out_scale: float | None = None) -> int:
        """CONV_2D (codes O×I×kh×kw) or DEPTHWISE_CONV_2D (codes C×kh×kw) writing sat16(⌊(Σ codes·x + bias)·gain + ½⌋).

        Gains above ``MAX_GAIN`` are split: the codes are multiplied by a power
        of two as far as int8 allows, the gain divided by it.
        """
        schema = self.graph.schema
        gain = representable_gain(np.broadcast_to(np.asarray(gain, dtype=np.float64), (codes.shape[0],)))
        bias = np.broadcast_to(np.asarray(bias, dtype=np.int64), (codes.shape[0],))
        silent = gain == 0  # a channel that adds nothing: zero codes, any gain
        codes = np.where(silent.reshape(-1, *([1] * (codes.ndim - 1))), 0, codes)
        gain, bias = np.where(silent, 1.0, gain), np.where(silent, 0, bias)
        flat = np.abs(codes.reshape(codes.shape[0], -1).astype(np.int64)).max(1)
        headroom = np.floor(np.log2(127 / np.maximum(flat, 1))).astype(np.int64)  # codes may double this many times
        shift = np.clip(np.ceil(np.log2(np.maximum(gain / MAX_GAIN, 1))).astype(np.int64), 0, headroom)
        if np.any(gain / 2.0**shift >= 2 * MAX_GAIN):
            raise self.error(f"needs a requantization gain of {float(gain.max()):.4g}, beyond what 16x8 kernels apply")
        codes = codes.astype(np.int64) * (2**shift).reshape(-1, *([1] * (codes.ndim - 1)))
        gain, bias = gain / 2.0**shift, bias * 2**shift
        out_scale = self.graph.scale if out_scale is None else out_scale
        weight_scale = np.float32(gain * out_scale / self.graph.scale)
        source, tflite_padding = self.padded(source, padding, codes.shape[-2:], stride, name)
        height, width, _ = self.graph.shape(source)
        if tflite_padding == schema.Padding.SAME:
            out_h, out_w = -(-height // stride[0]), -(-width // stride[1])
        else:
            out_h, out_w = (height - codes.shape[-2]) // stride[0] + 1, (width - codes.shape[-1]) // stride[1] + 1
        channels = codes.shape[0]
        bias_scale = np.float32(self.graph.scale) * weight_scale
        if kind == "CONV_2D":
            filters = np.transpose(codes, (0, 2, 3, 1))  # O, kh, kw, I: TFLite's filter layout
            options = schema.Conv2DOptionsT()
            axis = 0
        else:
            filters = np.transpose(codes, (1, 2, 0))[None]  # 1, kh, kw, C
            options = schema.DepthwiseConv2DOptionsT()
            options.depthMultiplier = 1
            axis = 3
        filters_tensor = self.graph.tensor(f"{name}/weights", filters.shape, "int8", weight_scale, axis, filters.astype(np.int8))
        bias_tensor = self.graph.tensor(f"{name}/bias", (channels,), "int64", bias_scale, 0, bias)
        out = self.graph.activation(name, (out_h, out_w, channels), out_scale)
        options.padding, options.strideH, options.strideW = tflite_padding, int(stride[0]), int(stride[1])
        options.fusedActivationFunction = schema.ActivationFunctionType.RELU if relu else schema.ActivationFunctionType.NONE
        self.graph.operator(kind, [source, filters_tensor, bias_tensor], [out], options)
        return out

    def minimum_one(self, tensor: int, name: str) -> int:
        """min(tensor, 1): with a RELU before it, the spike [value ≥ 1]."""
        one = self.graph.constant("one", np.ones((1, 1, 1, 1)), "int16", self.graph.scale)
        out = self.graph.activation(name, self.graph.shape(tensor))
        self.graph.operator("MINIMUM", [tensor, one], [out])
        return out

    def add(self, left: int, right: int, name: str, relu: bool = False) -> int:
        """left + right, saturating at int16: exact, both at the shared scale."""
        schema = self.graph.schema
        options = schema.AddOptionsT()
        options.potScaleInt16 = False  # general int16 kernel: equal scales add exactly, whatever the scale
        options.fusedActivationFunction = schema.ActivationFunctionType.RELU if relu else schema.ActivationFunctionType.NONE
        out = self.graph.activation(name, self.graph.shape(left))
        self.graph.operator("ADD", [left, right], [out], options)
        return out

    def add_wide(self, left: int, right: int, name: str) -> int:
        """left + right in int64 (plain integers, no scales)."""
        out = self.graph.tensor(name, self.graph.tensors[left].shape, "int64")
        self.graph.operator("ADD", [left, right], [out], self.graph.schema.AddOptionsT())
        return out

    def flatten(self, tensor: int, channels: int, dtype: str, scale: float) -> int:
        """N×1×1×C -> N×C (the logits), named ``LOGITS`` where it is the output."""
        schema = self.graph.schema
        shape = self.graph.constant("logits/shape", np.array([-1, channels]), "int32")
        out = self.graph.tensor(LOGITS if dtype != "int16" else f"{LOGITS}/int16", (1, channels), dtype, scale)
        options = schema.ReshapeOptionsT()
        options.newShape = [-1, channels]
        self.graph.operator("RESHAPE", [tensor, shape], [out], options)
        return out

    def accumulator(self, name: str, gain: np.ndarray, bias: np.ndarray, relu: bool = False, out_scale: float | None = None) -> int:
        """int16 tensor sat16(⌊(acc + bias)·gain + ½⌋) per channel of program tensor ``name``.

        ``acc`` is the tensor's integer value: an accumulator is computed here
        by its conv (through its pooling, if any), with the gain and bias asked
        for; an exact tensor goes through a 1×1 DEPTHWISE_CONV_2D unless gain 1
        and bias 0 leave it as it is.
        """
        spec = self.spec(name)
        channels = spec.shape[0]
        gain = np.broadcast_to(np.asarray(gain, dtype=np.float64), (channels,))
        bias = np.broadcast_to(np.asarray(bias, dtype=np.int64), (channels,))
        label = self.label(name, "int16_")
        if name in self.value:
            if np.all(gain == 1) and np.all(bias == 0) and not relu and out_scale is None:
                return self.value[name]
            ones = np.ones((channels, 1, 1), dtype=np.int64)
            return self.weighted("DEPTHWISE_CONV_2D", label, self.value[name], ones, gain, bias, (1, 1), (0, 0), relu, out_scale)
        op = self.producer[name]
        if op.kind == "conv":
            return self.weighted("CONV_2D", label, self.exact(op.inputs[0]), op.arrays["weight"], gain, bias, op.attrs["stride"], op.attrs["padding"], relu, out_scale)
        if op.kind == "maxpool":
            # A positive gain and a bias commute with the maximum; zero padding is neutral once RELU made every value ≥ 0.
            if any(op.attrs["padding"]) and not relu and not _same_padding(spec_hw(self.spec(op.inputs[0])), op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"]):
                raise self.error("max pooling with padding over an accumulator is only exported before a neuron")
            inner = self.accumulator(op.inputs[0], gain, bias, relu)
            return self.pool("MAX_POOL_2D", label, inner, op, out_scale)
        if op.kind == "avgpool":
            # The window sum runs on int16 values: the accumulator is first brought into range by a power of two.
            source = self.spec(op.inputs[0])
            inner_gain = min(1.0, _power_of_two_at_most(INT16_MAX / max(source.maximum, 1)))
            inner = self.accumulator(op.inputs[0], inner_gain, 0)
            ones = np.ones((channels, *op.attrs["kernel"]), dtype=np.int64)
            return self.weighted("DEPTHWISE_CONV_2D", label, inner, ones, gain / inner_gain, np.round(bias * inner_gain).astype(np.int64), op.attrs["stride"], op.attrs["padding"], relu, out_scale)
        raise self.error(f"reads {name!r}, written by a {op.kind!r} op, as an accumulator")

    def pool(self, kind: str, name: str, source: int, op: Op, out_scale: float | None = None) -> int:
        schema = self.graph.schema
        kernel, stride, padding = op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"]
        source, tflite_padding = self.padded(source, padding, kernel, stride, name)
        height, width, channels = self.graph.shape(source)
        if tflite_padding == schema.Padding.SAME:
            out_h, out_w = -(-height // stride[0]), -(-width // stride[1])
        else:
            out_h, out_w = (height - kernel[0]) // stride[0] + 1, (width - kernel[1]) // stride[1] + 1
        options = schema.Pool2DOptionsT()
        options.padding, options.strideH, options.strideW = tflite_padding, int(stride[0]), int(stride[1])
        options.filterHeight, options.filterWidth = int(kernel[0]), int(kernel[1])
        out = self.graph.activation(name, (out_h, out_w, channels), self.graph.tensors[source].quantization.scale[0] if out_scale is None else out_scale)
        self.graph.operator(kind, [source], [out], options)
        return out

    def fire(self, name: str, threshold: np.ndarray, maximum: int, out: str) -> int:
        """The spike [acc ≥ θ] of accumulator ``name`` (|acc| ≤ maximum), exactly.

        y = ⌊(acc + 2^(k−1) − θ)/2^k + ½⌋ ≥ 1 ⟺ acc ≥ θ; k > 0 only where
        acc − θ could leave int32 (the kernels' result type).
        """
        threshold = np.clip(np.asarray(threshold, dtype=np.int64), -maximum, maximum + 1)  # beyond: never or always
        k = max(0, (2 * maximum + 2).bit_length() - 31)
        bias = (1 if k == 0 else 2 ** (k - 1)) - threshold
        return self.minimum_one(self.accumulator(name, 2.0**-k, bias, relu=True), out)


def spec_hw(spec: TensorSpec) -> tuple[int, int]:
    return spec.shape[1], spec.shape[2]


# -- emitters: one per program op kind ------------------------------------


def _conv_maximum(writer: _Writer, op: Op) -> int:
    codes = op.arrays["weight"].reshape(op.arrays["weight"].shape[0], -1).astype(np.int64)
    return int(np.abs(codes).sum(1).max()) * writer.spec(op.inputs[0]).maximum


def _emit_conv(writer: _Writer, op: Op) -> None:
    if writer.spec(op.inputs[0]).kind == "s32":
        raise writer.error("a convolution reading an accumulator has no int16 form")
    if "threshold" in op.arrays:
        # conv + fire: the accumulator is the conv's own, never stored.
        accumulator, maximum = f"{op.output}/acc", _conv_maximum(writer, op)
        writer.producer[accumulator] = Op("conv", op.inputs, accumulator, op.source, op.attrs, {"weight": op.arrays["weight"]})
        writer.specs[accumulator] = TensorSpec(accumulator, "s32", writer.spec(op.output).shape, maximum, writer.spec(op.output).scale)
        writer.value[op.output] = writer.fire(accumulator, op.arrays["threshold"], maximum, op.output)
    # Without fire the accumulator is emitted by the op that reads it.


def _emit_fire(writer: _Writer, op: Op) -> None:
    writer.value[op.output] = writer.fire(op.inputs[0], op.arrays["threshold"], writer.spec(op.inputs[0]).maximum, op.output)


def _emit_add_fire(writer: _Writer, op: Op) -> None:
    terms = [writer.spec(name) for name in op.inputs]
    multipliers = [op.arrays[f"multiplier{index}"].astype(np.int64) for index in range(len(terms))]
    threshold = op.arrays["threshold"].astype(np.int64)
    channels = terms[0].shape[0]
    reach = [m * term.maximum for m, term in zip(multipliers, terms)]  # largest |m_t·x_t| per channel
    anchor = max(range(len(terms)), key=lambda index: (terms[index].kind == "s32", int(reach[index].max())))
    others = [index for index in range(len(terms)) if index != anchor]
    m_anchor, anchor_max = multipliers[anchor], terms[anchor].maximum
    if len(terms) == 2 and terms[others[0]].kind == "bits" and terms[others[0]].maximum == 1 and anchor_max <= TERM_UNITS:
        # a ≥ A(x) with x ∈ {0, 1}: exact in the anchor's own unit.
        other = others[0]
        limits = (-anchor_max, anchor_max + 1)  # thresholds beyond |a| ≤ max act alike
        a0 = np.clip(_ceil_div(threshold, m_anchor), *limits)
        a1 = np.clip(_ceil_div(threshold - multipliers[other], m_anchor), *limits)
        total = writer.accumulator(op.inputs[anchor], 1.0, 1 - a0)
        step = writer.accumulator(op.inputs[other], (a0 - a1).astype(np.float64), 0)
        writer.value[op.output] = writer.minimum_one(writer.add(total, step, f"{op.output}/sum", relu=True), op.output)
        return
    # Rounded: unit = m_a / 2^k per channel, the other terms within TERM_UNITS units.
    other_reach = np.sum([reach[index] for index in others], axis=0).astype(np.float64)
    with np.errstate(divide="ignore"):
        k = np.floor(np.log2(TERM_UNITS * m_anchor / np.maximum(other_reach, 1)))
    k = np.clip(k, -30, math.log2(MAX_GAIN))
    unit = m_anchor / 2.0**k
    scaled_threshold = threshold / unit  # θ in units
    bias = -np.round(threshold / m_anchor).astype(np.int64)  # the anchor's bias, in its own steps
    remainder = -scaled_threshold - bias * 2.0**k
    offset = 1 + np.floor(remainder)
    if np.all(k <= 0):
        # The anchor's bias is as fine as a unit: the remainder joins it.
        bias = bias + np.round(offset * 2.0**-k).astype(np.int64)
        offset = np.zeros(channels)
    total = writer.accumulator(op.inputs[anchor], 2.0**k, bias)
    for position, index in enumerate(others):
        term = writer.accumulator(op.inputs[index], multipliers[index] / unit, 0)
        last = position == len(others) - 1 and not np.any(offset)
        total = writer.add(total, term, f"{op.output}/sum{position}", relu=last)
    if np.any(offset):
        constant = writer.graph.constant(f"{op.output}/offset", offset.reshape(1, 1, 1, -1), "int16", writer.graph.scale)
        total = writer.add(total, constant, f"{op.output}/offset_sum", relu=True)
    writer.value[op.output] = writer.minimum_one(total, op.output)


def _emit_avgpool(writer: _Writer, op: Op) -> None:
    spec = writer.spec(op.output)
    if spec.kind == "s32":
        return  # a sum of accumulators: emitted by its reader (``_Writer.accumulator``)
    if spec.maximum > INT16_MAX:
        raise writer.error(f"its window sums reach {spec.maximum}, beyond int16")
    ones = np.ones((spec.shape[0], *op.attrs["kernel"]), dtype=np.int64)
    writer.value[op.output] = writer.weighted("DEPTHWISE_CONV_2D", op.output, writer.exact(op.inputs[0]), ones, 1.0, 0, op.attrs["stride"], op.attrs["padding"], False)


def _emit_maxpool(writer: _Writer, op: Op) -> None:
    if writer.spec(op.output).kind == "s32":
        return  # emitted by its reader
    # Spike counts are ≥ 0, so zero padding never wins a window that holds a real value.
    writer.value[op.output] = writer.pool("MAX_POOL_2D", op.output, writer.exact(op.inputs[0]), op)


def _emit_pad(writer: _Writer, op: Op) -> None:
    front, back, top, bottom, left, right = op.attrs["pad"]
    paddings = writer.graph.constant(f"{op.output}/paddings", np.array([[0, 0], [top, bottom], [left, right], [front, back]]), "int32")
    channels, height, width = writer.spec(op.output).shape
    out = writer.graph.activation(op.output, (height, width, channels))
    writer.graph.operator("PAD", [writer.exact(op.inputs[0]), paddings], [out])
    writer.value[op.output] = out


def _emit_slice(writer: _Writer, op: Op) -> None:
    schema = writer.graph.schema
    axis = {0: 3, 1: 1, 2: 2}[op.attrs["axis"]]  # C, H, W -> NHWC
    start, step, count = op.attrs["start"], op.attrs["step"], op.attrs["count"]
    begin, end, strides = np.zeros(4, dtype=np.int32), np.zeros(4, dtype=np.int32), np.ones(4, dtype=np.int32)
    begin[axis], end[axis], strides[axis] = start, start + step * (count - 1) + 1, step
    options = schema.StridedSliceOptionsT()
    options.beginMask = options.endMask = 0b1111 & ~(1 << axis)  # every other axis whole
    tensors = [writer.graph.constant(f"{op.output}/{what}", values, "int32") for what, values in (("begin", begin), ("end", end), ("strides", strides))]
    channels, height, width = writer.spec(op.output).shape
    out = writer.graph.activation(op.output, (height, width, channels))
    writer.graph.operator("STRIDED_SLICE", [writer.exact(op.inputs[0]), *tensors], [out], options)
    writer.value[op.output] = out


def _emit_cat(writer: _Writer, op: Op) -> None:
    schema = writer.graph.schema
    options = schema.ConcatenationOptionsT()
    options.axis = 3
    channels, height, width = writer.spec(op.output).shape
    out = writer.graph.activation(op.output, (height, width, channels))
    writer.graph.operator("CONCATENATION", [writer.exact(name) for name in op.inputs], [out], options)
    writer.value[op.output] = out


def signed_digits(values: np.ndarray, bits: int) -> list[np.ndarray]:
    """Digits d_j ∈ [−2^(bits−1), 2^(bits−1)) with values = Σ_j 2^(bits·j)·d_j, least significant first."""
    base, half = 2**bits, 2 ** (bits - 1)
    rest, digits = np.asarray(values, dtype=np.int64), []
    while np.any(rest != 0) or not digits:
        digit = (rest + half) % base - half
        digits.append(digit)
        rest = (rest - digit) // base
    return digits


def _digit_bits(writer: _Writer, op: Op) -> int:
    """Bits per digit of exact logits (0: they cannot be exact): the most with which every digit's conv sums within int16."""
    producer = writer.producer.get(op.inputs[0])
    if producer is None or producer.kind != "conv" or producer.inputs[0] not in writer.value:
        return 0
    weight = producer.arrays["weight"].astype(np.int64) * op.arrays["multiplier"].astype(np.int64).reshape(-1, 1, 1, 1)
    largest = max(writer.spec(producer.inputs[0]).maximum, 1)
    for bits in range(7, 0, -1):  # int8 codes hold digits of up to 7 bits
        sums = [np.abs(digit.reshape(len(digit), -1)).sum(1).max() * largest for digit in signed_digits(weight, bits)]
        if max(sums) <= INT16_MAX:
            return bits
    return 0


def _emit_output(writer: _Writer, op: Op) -> None:
    source = writer.spec(op.inputs[0])
    channels, height, width = source.shape
    if height * width != 1:
        raise writer.error(f"the logits come from a {channels}×{height}×{width} map; expected a vector")
    multiplier = op.arrays["multiplier"].astype(np.int64)
    offset = op.arrays["offset"].astype(np.int64)
    if np.any(multiplier <= 0):
        raise writer.error("a logit multiplier is not positive")
    bits = _digit_bits(writer, op)
    if bits:
        _exact_logits(writer, op, bits)
    else:
        _rounded_logits(writer, op)


def _exact_logits(writer: _Writer, op: Op, bits: int) -> None:
    """int64 logits equal to the program's: Σ (multiplier·w)·x + offset, the weights split into small signed digits.

    Each digit's conv sums exactly in int16; Horner's rule joins them in
    int64, multiplying by 2^bits as ``bits`` doublings (ADD of a tensor to
    itself), since the allowed ops have no MUL.
    """
    schema = writer.graph.schema
    conv = writer.producer[op.inputs[0]]
    channels = writer.spec(op.inputs[0]).shape[0]
    weight = conv.arrays["weight"].astype(np.int64) * op.arrays["multiplier"].astype(np.int64).reshape(-1, 1, 1, 1)
    source = writer.value[conv.inputs[0]]
    total = None
    for place, digit in reversed(list(enumerate(signed_digits(weight, bits)))):
        name = f"{op.output}/digit{place}"
        part = writer.weighted("CONV_2D", name, source, digit, 1.0, 0, conv.attrs["stride"], conv.attrs["padding"], False)
        wide = writer.graph.tensor(f"{name}/int64", (1, 1, 1, channels), "int64")
        options = schema.CastOptionsT()
        options.inDataType, options.outDataType = schema.TensorType.INT16, schema.TensorType.INT64
        writer.graph.operator("CAST", [part], [wide], options)
        if total is not None:
            for doubling in range(bits):
                total = writer.add_wide(total, total, f"{name}/doubled{doubling}")
            wide = writer.add_wide(total, wide, f"{name}/sum")
        total = wide
    offset = writer.graph.constant(f"{op.output}/offset", op.arrays["offset"].astype(np.int64).reshape(1, 1, 1, -1), "int64")
    total = writer.add_wide(total, offset, f"{op.output}/with_offset")
    writer.logits = writer.flatten(total, channels, "int64", writer.program.output_scale)


def _rounded_logits(writer: _Writer, op: Op) -> None:
    """int16 logits ⌊(acc + ⌊offset/multiplier⌉)·multiplier/D + ½⌋, D the largest |logit| / 32767, as float32."""
    source = writer.spec(op.inputs[0])
    channels = source.shape[0]
    multiplier = op.arrays["multiplier"].astype(np.int64)
    offset = op.arrays["offset"].astype(np.int64)
    unit = float((multiplier * source.maximum + np.abs(offset)).max()) / INT16_MAX
    scale = float(np.float32(writer.program.output_scale * unit))
    bias = np.round(offset / multiplier).astype(np.int64)
    values = writer.accumulator(op.inputs[0], multiplier / unit, bias, out_scale=scale)
    flat = writer.flatten(values, channels, "int16", scale)
    writer.logits = writer.graph.tensor(LOGITS, (1, channels), "float32")
    writer.graph.operator("DEQUANTIZE", [flat], [writer.logits])


EMITTERS: dict[str, Callable[[_Writer, Op], None]] = {
    "conv": _emit_conv,
    "fire": _emit_fire,
    "add_fire": _emit_add_fire,
    "avgpool": _emit_avgpool,
    "maxpool": _emit_maxpool,
    "pad": _emit_pad,
    "slice": _emit_slice,
    "cat": _emit_cat,
    "output": _emit_output,
}


def tflite_bytes(program: Program, stamp: str = "") -> bytes:
    """The program as a 16x8-quantized TFLite model (see the module docstring for each op's form).

    Input ``images``: float32 1×H×W×C (resizable batch), normalised as the
    model expects; output ``logits``: float32 1×classes. ``stamp`` becomes the
    model's description ("Generated by <stamp>. Do not edit.").
    """
    writer = _Writer(program)
    channels, height, width = program.input_shape
    images = writer.graph.tensor(IMAGES, (1, height, width, channels), "float32")
    writer.graph.tensors[images].shapeSignature = [-1, height, width, channels]
    quantized = writer.graph.activation(program.input, (height, width, channels))
    writer.graph.operator("QUANTIZE", [images], [quantized])
    writer.value[program.input] = quantized
    for op in program.ops:
        emitter = EMITTERS.get(op.kind)
        if emitter is None:
            raise ExportError(f"export tflite: op {op.kind!r} of node {op.source!r} has no TFLite form; known: {', '.join(EMITTERS)}")
        writer.op = op
        emitter(writer, op)
    writer.op = None
    if writer.logits is None:
        raise ExportError("export tflite: the program has no output op")
    description = f"Generated by {stamp}. Do not edit." if stamp else "Generated by edgesnn. Do not edit."
    return writer.graph.serialize([images], [writer.logits], description)


# ---------------------------------------------------------------------------
# Runner


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise ExportError("export tflite: running a TFLite file needs ai-edge-litert (or tflite-runtime)") from None
    return Interpreter


def run_tflite(data: bytes, images: np.ndarray, batch: int = 1, threads: int = 1) -> np.ndarray:
    """float32 logits (N×classes) of a TFLite model on N×C×H×W float32 images, normalised as the model expects.

    The images are transposed to the model's N×H×W×C and run ``batch`` at a
    time (the input is resized to the batch).
    """
    if batch < 1 or threads < 1:
        raise ExportError(f"export tflite: batch {batch} and threads {threads} must be at least 1")
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ExportError(f"export tflite: images must be N×C×H×W, got shape {images.shape}")
    interpreter = _interpreter_class()(model_content=data, num_threads=threads)
    source = interpreter.get_input_details()[0]
    expected = tuple(source["shape"][1:])
    images = np.ascontiguousarray(np.transpose(images, (0, 2, 3, 1)))
    if tuple(images.shape[1:]) != expected:
        raise ExportError(f"export tflite: images of shape {tuple(images.shape[1:])} (H×W×C after transposing), the model expects {expected}")
    target = interpreter.get_output_details()[0]
    results, size = [], None
    for first in range(0, len(images), batch):
        chunk = images[first : first + batch]
        if len(chunk) != size:
            interpreter.resize_tensor_input(source["index"], [len(chunk), *expected])
            interpreter.allocate_tensors()
            size = len(chunk)
        interpreter.set_tensor(source["index"], chunk)
        interpreter.invoke()
        results.append(interpreter.get_tensor(target["index"]).copy())
    if not results:
        return np.zeros((0, int(target["shape"][-1])), dtype=np.float64)
    logits = np.concatenate(results).reshape(len(images), -1)
    if np.issubdtype(logits.dtype, np.integer):  # exact integer logits: their real scale is the tensor's
        return logits.astype(np.float64) * float(target["quantization"][0])
    return logits.astype(np.float64)


def tflite_operators(data: bytes) -> list[str]:
    """Names of the builtin operators of a TFLite file, one per operator, in order."""
    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    names = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    codes = [names.get(max(code.builtinCode, code.deprecatedBuiltinCode), str(code.builtinCode)) for code in model.operatorCodes]
    return [codes[operator.opcodeIndex] for subgraph in model.subgraphs for operator in subgraph.operators]


__all__ = ["EMITTERS", "IMAGES", "LOGITS", "OP_VERSIONS", "representable_gain", "requantize", "run_tflite", "tflite_bytes", "tflite_operators"]
