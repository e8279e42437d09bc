"""TFLite flatbuffer of an integer program, and the interpreter run that checks it.

``tflite_bytes(program, stamp)`` writes the program as a 16x8-quantized TFLite
model (int16 activations, int8 weights, int64 biases) with the flatbuffer
schema shipped in ``ai_edge_litert``; TensorFlow is not needed.

- Input ``images``: float32 N×H×W×C (TFLite's channels-last layout),
  normalised as the model expects. QUANTIZE makes it the program's int16
  image q = round(x / s), s = ``program.input_scale``: for the 256 levels of
  a uint8 pixel this is ``program.input_table`` (a level whose normalised
  value lies within float32 rounding of a half step could differ by one;
  none does for Fashion-MNIST's normalisation).
- Output ``logits``: int64 N×classes, the program's integer logits; the
  tensor's quantization scale is ``program.output_scale`` (real logit =
  scale · value). Where the last layer does not allow it (see ``output``
  below) the logits are int16 at a coarser unit, DEQUANTIZEd to float32.

Every int16 tensor has the one scale s and zero point 0, so the
requantization multiplier s·w_c/s of a convolution is its weight scale w_c.
Each w_c is a power of two times a 15-bit integer, which TFLite's 16x8
kernels apply exactly: they write sat16(⌊(acc + b_c)·w_c + ½⌋), acc being the
exact int64 sum of int8 codes times int16 inputs and b_c the int64 bias. The
program's ops (``EMITTERS``) become:

- conv + fire, spike = [acc ≥ θ]: CONV_2D with w_c = 1, bias 1 − θ and a
  fused RELU, then MINIMUM with 1: min(max(acc + 1 − θ, 0), 1). Exact
  (saturating at int16 keeps the sign). Binary layers are int8 ±1 codes:
  TFLite has no 1-bit weights.
- conv without fire: an accumulator, written where it is read, with the gain
  and bias its reader needs. A linear layer is a CONV_2D whose VALID kernel
  covers the map. A fire on an accumulator is conv + fire, also through a max
  pooling (which commutes with the monotone requantization).
- avgpool (window sums): DEPTHWISE_CONV_2D with an all-ones kernel. Exact.
- maxpool, pad, slice, cat: MAX_POOL_2D, PAD, STRIDED_SLICE, CONCATENATION.
  Exact. Padding is TFLite's SAME where that places the windows as PyTorch
  does, else an explicit PAD with zeros.
- add_fire, Σ m_t·x_t ≥ θ in int64: every term is brought to int16 in one unit
  per channel by its conv (a 1×1 DEPTHWISE_CONV_2D for a spike map), the terms
  meet in ADDs (equal scales: an exact saturating sum), and the last ADD's
  fused RELU with MINIMUM 1 gives the spike. One accumulator a with one 0/1
  spike map x is exact, written in a's unit as
  a + 1 − A(0) + (A(0) − A(1))·x ≥ 1 with A(x) = ⌈(θ − m_x·x)/m_a⌉.
  Two terms where one, x, takes few values (at most STEP_LIMIT + 1, as the
  accumulator of a binary 1×1 shortcut does) are exact the same way, with A a
  staircase: a + 1 − A(x_0) + Σ_j (A(j − 1) − A(j))·[x ≥ j] ≥ 1, the steps
  [x ≥ j] from a broadcast ADD of x and the constants 1 − j (RELU, MINIMUM 1),
  summed with their int8 heights by a 1×J DEPTHWISE_CONV_2D.
  Any other mix (more terms, wide ranges on both sides) is rounded: the
  unit is m_a/2^k for the widest accumulator a, k as large as keeps the other
  terms within 2^14 units, each other term is ⌊m_t·x_t/unit + ½⌋ and the
  threshold's remainder is one more ADD of a constant. Such a spike can
  differ from the program's only where Σ m_t·x_t lies within about one unit
  per term of θ.
- output, logits = acc·multiplier + offset: exact. With W = multiplier·w the
  program's weights at the logits' scale (up to 24 bits), W is split into
  signed digits W = Σ_j 2^(b·j)·d_j small enough that each digit's CONV_2D
  sums exactly in int16; CAST to int64 and ADD join them by Horner's rule,
  the multiplications by 2^b done as b doublings (there is no MUL among the
  ops used). This costs as many copies of the last layer's weights as there
  are digits (5 to 7). Where the last layer reads an accumulator's pooling,
  or its digits cannot sum within int16, the logits are int16 instead,
  ⌊logit/D + ½⌋ with D = the largest possible |logit| / 32767: two classes
  whose logits differ by less than about D may then swap.
- An average pooling of an accumulator (``lower`` emits none for the zoo
  models) sums a power-of-two requantization of it, which rounds.

``run_tflite(data, images)`` runs the file with ``ai_edge_litert``'s
interpreter (``tflite_runtime`` where that is missing) on N×C×H×W float32
images and returns real-valued logits.
"""

from __future__ import annotations

import math
from typing import Callable

import flatbuffers
import numpy as np

from edgesnn.errors import ExportError

from .program import Op, Program, TensorSpec

IMAGES = "images"  # the model's input tensor
LOGITS = "logits"  # the model's output tensor
INT16_MAX = 2**15 - 1
INT32_MAX = 2**31 - 1
GAIN_BITS = 15  # TFLite's 16x8 requantization keeps 15 significant bits of a multiplier
MAX_GAIN = 2**13  # multipliers must stay below 2^14: the kernels shift right by 15 − ⌈log2⌉ of it, at least 1
TERM_UNITS = 2**14 - 1  # in a rounded add, the terms besides the anchor stay within this many units
STEP_LIMIT = 128  # an add of two terms is exact when one of them takes at most this many values + 1
STEPPED_LARGEST = 2**13 - 2  # ... and the other's |value| stays within this, so that a − T(x) + 1 fits int16
SCHEMA_VERSION = 3  # of the TFLite flatbuffer format

# The builtin ops an exported model may contain, with the version recorded for each (that of its int16 kernel).
OP_VERSIONS = {
    "QUANTIZE": 1,
    "CONV_2D": 4,
    "DEPTHWISE_CONV_2D": 5,
    "MINIMUM": 4,
    "ADD": 4,
    "MAX_POOL_2D": 3,
    "PAD": 4,
    "STRIDED_SLICE": 5,
    "CONCATENATION": 3,
    "CAST": 1,
    "RESHAPE": 1,
    "DEQUANTIZE": 4,
}


def _schema():
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        raise ExportError("tflite: writing a TFLite file needs the ai-edge-litert package") from None
    return schema


# ---------------------------------------------------------------------------
# Flatbuffer


class _Graph:
    """The one subgraph being written: tensors, constant buffers, operators."""

    def __init__(self, scale: float):
        self.schema = _schema()
        self.scale = float(np.float32(scale))  # of every int16 activation
        self.tensors: list = []
        self.buffers: list[np.ndarray | None] = [None]  # buffer 0: the empty one of every tensor without data
        self.operators: list = []
        self.opcodes: dict[str, int] = {}
        self.constants: dict[tuple, int] = {}

    def tensor(self, name: str, shape, dtype: str, scale=None, axis: int = 0, data: np.ndarray | None = None) -> int:
        """A new tensor (its index); ``scale`` makes it quantized, per ``axis`` where it holds several."""
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
        """An int16 activation 1×H×W×C (the batch resizes) at the shared scale unless ``scale``."""
        return self.tensor(name, (1, *shape), "int16", self.scale if scale is None else scale)

    def constant(self, name: str, values, dtype: str, scale=None) -> int:
        """A constant tensor; equal constants (the 1 of every MINIMUM) are one tensor."""
        values = np.asarray(values).astype(dtype)
        key = (dtype, values.shape, values.tobytes(), None if scale is None else float(np.float32(scale)))
        if key not in self.constants:
            self.constants[key] = self.tensor(name, values.shape, dtype, scale, 0, values)
        return self.constants[key]

    def operator(self, kind: str, inputs: list[int], outputs: list[int], options=None) -> None:
        schema = self.schema
        operator = schema.OperatorT()
        operator.opcodeIndex = self.opcodes.setdefault(kind, len(self.opcodes))
        operator.inputs, operator.outputs = inputs, outputs
        if options is not None:
            operator.builtinOptionsType = getattr(schema.BuiltinOptions, type(options).__name__.removesuffix("T"))
            operator.builtinOptions = options
        self.operators.append(operator)

    def shape(self, tensor: int) -> tuple[int, ...]:
        """H, W, C of an activation."""
        return tuple(self.tensors[tensor].shape[1:])

    def serialize(self, inputs: list[int], outputs: list[int], description: str) -> bytes:
        schema = self.schema
        subgraph = schema.SubGraphT()
        subgraph.name = "main"
        subgraph.tensors, subgraph.inputs, subgraph.outputs, subgraph.operators = self.tensors, inputs, outputs, self.operators
        codes = []
        for kind in self.opcodes:  # in order of first use: opcodeIndex points into this list
            code = schema.OperatorCodeT()
            code.builtinCode = getattr(schema.BuiltinOperator, kind)
            code.deprecatedBuiltinCode = min(code.builtinCode, schema.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
            code.version = OP_VERSIONS[kind]
            codes.append(code)
        model = schema.ModelT()
        model.version = SCHEMA_VERSION
        model.description = description
        model.operatorCodes = codes
        model.subgraphs = [subgraph]
        model.buffers = [_AlignedBuffer(data) for data in self.buffers]
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


class _AlignedBuffer:
    """A constant buffer whose bytes start on a 16-byte boundary, so that int64 biases are read in place."""

    def __init__(self, data: np.ndarray | None):
        self.data = data

    def Pack(self, builder: flatbuffers.Builder) -> int:  # noqa: N802 (the name the schema's ModelT.Pack calls)
        schema = _schema()
        vector = None
        if self.data is not None and self.data.size:
            payload = self.data.tobytes()
            builder.StartVector(1, len(payload), 16)
            builder.head -= len(payload)
            builder.Bytes[builder.head : builder.head + len(payload)] = payload
            vector = builder.EndVector()
        schema.BufferStart(builder)
        if vector is not None:
            schema.BufferAddData(builder, vector)
        return schema.BufferEnd(builder)


# ---------------------------------------------------------------------------
# Integer arithmetic


def representable_gain(gain) -> np.ndarray:
    """Each gain rounded to 15 significant bits, which TFLite's 16x8 requantization applies exactly."""
    mantissa, exponent = np.frexp(np.asarray(gain, dtype=np.float64))
    return np.ldexp(np.round(mantissa * 2**GAIN_BITS) / 2**GAIN_BITS, exponent)


def signed_digits(values: np.ndarray, bits: int) -> list[np.ndarray]:
    """Digits d_j ∈ [−2^(bits−1), 2^(bits−1)) with values = Σ_j 2^(bits·j)·d_j, least significant first."""
    base, half = 2**bits, 2 ** (bits - 1)
    rest, digits = np.asarray(values, dtype=np.int64), []
    while np.any(rest != 0) or not digits:
        digit = (rest + half) % base - half
        digits.append(digit)
        rest = (rest - digit) // base
    return digits


def _ceil_div(numerator, denominator) -> np.ndarray:
    return -(-np.asarray(numerator, dtype=np.int64) // np.asarray(denominator, dtype=np.int64))


def _same_padding(size: tuple[int, int], kernel, stride, padding) -> bool:
    """Whether TFLite's SAME padding places the windows where PyTorch's symmetric ``padding`` does."""
    for extent, k, s, p in zip(size, kernel, stride, padding):
        same_out = -(-extent // s)
        before = max((same_out - 1) * s + k - extent, 0) // 2
        if (extent + 2 * p - k) // s + 1 != same_out or before != p:
            return False
    return True


# ---------------------------------------------------------------------------
# Program -> graph


class _Writer:
    """Writes the TFLite ops of one program; ``EMITTERS`` holds one function per program op kind."""

    def __init__(self, program: Program):
        self.program = program
        self.graph = _Graph(program.input_scale)
        self.value: dict[str, int] = {}  # program tensor -> the int16 tensor holding its integers exactly
        self.specs: dict[str, TensorSpec] = dict(program.tensors)  # and the accumulators of conv + fire
        self.producer: dict[str, Op] = {op.output: op for op in program.ops}
        self.logits: int | None = None
        self.op: Op | None = None  # the program op being written, for messages
        self.count = 0

    def error(self, message: str) -> ExportError:
        where = f"op {self.op.kind!r} of node {self.op.source!r}: " if self.op is not None else ""
        return ExportError(f"tflite: {where}{message}")

    def spec(self, name: str) -> TensorSpec:
        return self.specs[name]

    def name(self, base: str) -> str:
        """A fresh name for an intermediate tensor of ``base``."""
        self.count += 1
        return f"{base}/{self.count}"

    def exact(self, name: str) -> int:
        """The int16 tensor of the image, a spike map or spike counts."""
        if name not in self.value:
            raise self.error(f"reads {name!r}, an accumulator, where int16 values are needed; only spike maps and the image are held exactly")
        return self.value[name]

    # -- TFLite ops --------------------------------------------------------

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
        out = self.graph.activation(f"{name}/padded", (height + 2 * top, width + 2 * left, channels))
        self.graph.operator("PAD", [tensor, paddings], [out])
        return out, schema.Padding.VALID

    def _windows(self, source: int, padding: int, kernel, stride) -> tuple[int, int]:
        height, width, _ = self.graph.shape(source)
        if padding == self.graph.schema.Padding.SAME:
            return -(-height // stride[0]), -(-width // stride[1])
        return (height - kernel[0]) // stride[0] + 1, (width - kernel[1]) // stride[1] + 1

    def weighted(self, kind: str, name: str, source: int, codes: np.ndarray, gain, bias, stride, padding, relu: bool = False, out_scale: float | None = None) -> int:
        """CONV_2D (codes O×I×kh×kw) or DEPTHWISE_CONV_2D (codes C×kh×kw): sat16(⌊(Σ codes·x + bias)·gain + ½⌋).

        ``gain`` is rounded to 15 bits; one of 2^13 or more is shared with the
        codes, doubled as far as int8 allows. A channel of gain 0 gets zero codes.
        """
        schema = self.graph.schema
        channels = codes.shape[0]
        spread = (-1, *([1] * (codes.ndim - 1)))
        gain = representable_gain(np.broadcast_to(np.asarray(gain, dtype=np.float64), (channels,)))
        bias = np.broadcast_to(np.asarray(bias, dtype=np.int64), (channels,))
        silent = gain == 0
        codes = np.where(silent.reshape(spread), 0, codes).astype(np.int64)
        gain, bias = np.where(silent, 1.0, gain), np.where(silent, 0, bias)
        largest = np.abs(codes.reshape(channels, -1)).max(1)
        headroom = np.floor(np.log2(127 / np.maximum(largest, 1))).astype(np.int64)
        shift = np.clip(np.ceil(np.log2(np.maximum(gain / MAX_GAIN, 1))).astype(np.int64), 0, headroom)
        codes, gain, bias = codes * (2**shift).reshape(spread), gain / 2.0**shift, bias * 2**shift
        if np.any(gain >= 2 * MAX_GAIN):
            raise self.error(f"needs a requantization gain of {float(gain.max()):.4g}; 16x8 kernels apply less than {2 * MAX_GAIN}")
        # The kernel's multiplier is input scale · weight scale / output scale, which is the gain.
        weight_scale = gain if out_scale is None else gain * out_scale / self.graph.scale
        source, tflite_padding = self.padded(source, padding, codes.shape[-2:], stride, name)
        if kind == "CONV_2D":
            filters, axis, options = np.transpose(codes, (0, 2, 3, 1)), 0, schema.Conv2DOptionsT()  # O, kh, kw, I
        else:
            filters, axis, options = np.transpose(codes, (1, 2, 0))[None], 3, schema.DepthwiseConv2DOptionsT()  # 1, kh, kw, C
            options.depthMultiplier = 1
        options.padding, options.strideH, options.strideW = tflite_padding, int(stride[0]), int(stride[1])
        options.fusedActivationFunction = schema.ActivationFunctionType.RELU if relu else schema.ActivationFunctionType.NONE
        weights = self.graph.tensor(f"{name}/weights", filters.shape, "int8", weight_scale, axis, filters)
        biases = self.graph.tensor(f"{name}/bias", (channels,), "int64", np.float32(self.graph.scale) * np.float32(weight_scale), 0, bias)
        out = self.graph.activation(name, (*self._windows(source, tflite_padding, codes.shape[-2:], stride), channels), out_scale)
        self.graph.operator(kind, [source, weights, biases], [out], options)
        return out

    def pool(self, name: str, source: int, op: Op) -> int:
        """MAX_POOL_2D of ``op``'s window; zero padding where SAME does not fit (neutral for values ≥ 0)."""
        schema = self.graph.schema
        kernel, stride = op.attrs["kernel"], op.attrs["stride"]
        source, tflite_padding = self.padded(source, op.attrs["padding"], kernel, stride, name)
        options = schema.Pool2DOptionsT()
        options.padding, options.strideH, options.strideW = tflite_padding, int(stride[0]), int(stride[1])
        options.filterHeight, options.filterWidth = int(kernel[0]), int(kernel[1])
        scale = self.graph.tensors[source].quantization.scale[0]
        out = self.graph.activation(name, (*self._windows(source, tflite_padding, kernel, stride), self.graph.shape(source)[2]), scale)
        self.graph.operator("MAX_POOL_2D", [source], [out], options)
        return out

    def minimum_one(self, tensor: int, name: str) -> int:
        """min(tensor, 1): after a RELU, the spike [value ≥ 1]."""
        one = self.graph.constant("one", np.ones((1, 1, 1, 1)), "int16", self.graph.scale)
        out = self.graph.activation(name, self.graph.shape(tensor))
        self.graph.operator("MINIMUM", [tensor, one], [out])
        return out

    def add(self, left: int, right: int, name: str, relu: bool = False, shape: tuple[int, int, int] | None = None) -> int:
        """left + right in int16, saturating; exact, as both have the shared scale. ``shape``: where they broadcast."""
        schema = self.graph.schema
        options = schema.AddOptionsT()
        options.potScaleInt16 = False  # the general int16 kernel: it adds equal scales exactly, whatever they are
        options.fusedActivationFunction = schema.ActivationFunctionType.RELU if relu else schema.ActivationFunctionType.NONE
        out = self.graph.activation(name, shape or self.graph.shape(left))
        self.graph.operator("ADD", [left, right], [out], options)
        return out

    def add_int64(self, left: int, right: int, name: str) -> int:
        out = self.graph.tensor(name, self.graph.tensors[left].shape, "int64")
        self.graph.operator("ADD", [left, right], [out], self.graph.schema.AddOptionsT())
        return out

    def cast_int64(self, tensor: int, name: str) -> int:
        schema = self.graph.schema
        options = schema.CastOptionsT()
        options.inDataType, options.outDataType = schema.TensorType.INT16, schema.TensorType.INT64
        out = self.graph.tensor(name, self.graph.tensors[tensor].shape, "int64")
        self.graph.operator("CAST", [tensor], [out], options)
        return out

    def reshape(self, tensor: int, shape: tuple[int, ...], name: str, dtype: str = "int16", scale: float | None = None) -> int:
        """N×… -> N×``shape``, the same values in the same order (at the input's scale unless ``scale``)."""
        schema = self.graph.schema
        new_shape = [-1, *(int(v) for v in shape)]
        scale = self.graph.tensors[tensor].quantization.scale[0] if scale is None else scale
        constant = self.graph.constant("shape", new_shape, "int32")
        out = self.graph.tensor(name, (1, *shape), dtype, scale)
        options = schema.ReshapeOptionsT()
        options.newShape = new_shape
        self.graph.operator("RESHAPE", [tensor, constant], [out], options)
        return out

    def flatten(self, tensor: int, name: str, dtype: str, scale: float) -> int:
        """N×1×1×C -> N×C."""
        return self.reshape(tensor, (self.graph.shape(tensor)[2],), name, dtype, scale)

    def steps(self, name: str, starts: np.ndarray, heights: np.ndarray, out: str) -> int:
        """Σ_m heights[m, c]·[x_c ≥ starts[m]] per channel c of the integer tensor ``name`` (|x| small), exactly.

        x as N×HW×1×C plus the constants 1 − starts[m] as 1×1×M×1 broadcast to
        N×HW×M×C; RELU and MINIMUM 1 make the steps [x_c ≥ starts[m]], and a 1×M
        DEPTHWISE_CONV_2D sums each channel's steps with their int8 heights.
        """
        x = self.accumulator(name, 1.0, 0)
        height, width, channels = self.graph.shape(x)
        count = len(starts)
        column = self.reshape(x, (height * width, 1, channels), self.name(out))
        offsets = self.graph.constant(f"{out}/offsets", (1 - np.asarray(starts, dtype=np.int64)).reshape(1, 1, count, 1), "int16", self.graph.scale)
        grid = self.add(column, offsets, self.name(out), relu=True, shape=(height * width, count, channels))
        bits = self.minimum_one(grid, self.name(out))
        summed = self.weighted("DEPTHWISE_CONV_2D", self.name(out), bits, np.asarray(heights, dtype=np.int64).T[:, None, :], 1.0, 0, (1, 1), (0, 0))
        return self.reshape(summed, (height, width, channels), self.name(out))

    # -- program values ----------------------------------------------------

    def accumulator(self, name: str, gain, bias, relu: bool = False, out_scale: float | None = None) -> int:
        """int16 sat16(⌊(acc + bias)·gain + ½⌋) per channel, acc the integer value of program tensor ``name``.

        An accumulator is computed here by its conv (and pooling), with the
        gain and bias asked for; a tensor held exactly goes through a 1×1
        DEPTHWISE_CONV_2D, unless gain 1 and bias 0 leave it as it is.
        """
        channels = self.spec(name).shape[0]
        gain = np.broadcast_to(np.asarray(gain, dtype=np.float64), (channels,))
        bias = np.broadcast_to(np.asarray(bias, dtype=np.int64), (channels,))
        if name in self.value:
            if np.all(gain == 1) and not np.any(bias) and not relu and out_scale is None:
                return self.value[name]
            ones = np.ones((channels, 1, 1), dtype=np.int64)
            return self.weighted("DEPTHWISE_CONV_2D", self.name(name), self.value[name], ones, gain, bias, (1, 1), (0, 0), relu, out_scale)
        op = self.producer[name]
        if op.kind == "conv":
            return self.weighted("CONV_2D", self.name(name), self.exact(op.inputs[0]), op.arrays["weight"], gain, bias, op.attrs["stride"], op.attrs["padding"], relu, out_scale)
        if op.kind == "maxpool":
            # A positive gain and a bias commute with the maximum.
            _, height, width = self.spec(op.inputs[0]).shape
            if not relu and any(op.attrs["padding"]) and not _same_padding((height, width), op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"]):
                raise self.error("a max pooling with this padding over an accumulator is only exported before a neuron (zero padding needs values ≥ 0)")
            return self.pool(self.name(name), self.accumulator(op.inputs[0], gain, bias, relu, out_scale), op)
        if op.kind == "avgpool":
            # The window is summed over int16 values: the accumulator is first divided by a power of two that fits it (rounding).
            largest = max(self.spec(op.inputs[0]).maximum, 1)
            inner_gain = min(1.0, 2.0 ** math.floor(math.log2(INT16_MAX / largest)))
            inner = self.accumulator(op.inputs[0], inner_gain, 0)
            ones = np.ones((channels, *op.attrs["kernel"]), dtype=np.int64)
            outer_bias = np.round(bias * inner_gain).astype(np.int64)
            return self.weighted("DEPTHWISE_CONV_2D", self.name(name), inner, ones, gain / inner_gain, outer_bias, op.attrs["stride"], op.attrs["padding"], relu, out_scale)
        raise self.error(f"reads {name!r}, written by a {op.kind!r} op, as an accumulator")

    def fire(self, name: str, threshold, maximum: int, out: str) -> int:
        """The spike [acc ≥ θ] of accumulator ``name`` (|acc| ≤ ``maximum``), exactly.

        ⌊(acc + 2^(k−1) − θ)/2^k + ½⌋ ≥ 1 ⟺ acc ≥ θ; k > 0 only where
        acc − θ could leave int32 (the type of the kernel's result).
        """
        threshold = np.clip(np.asarray(threshold, dtype=np.int64), -maximum, maximum + 1)  # beyond: never or always fires
        k = max(0, (2 * maximum + 2).bit_length() - 31)
        bias = (1 if k == 0 else 2 ** (k - 1)) - threshold
        return self.minimum_one(self.accumulator(name, 2.0**-k, bias, relu=True), out)


# -- emitters: one per program op kind ------------------------------------


def _emit_conv(writer: _Writer, op: Op) -> None:
    if writer.spec(op.inputs[0]).kind == "s32":
        raise writer.error("a convolution of an accumulator has no int16 form")
    if "threshold" not in op.arrays:
        return  # an accumulator: written by the op that reads it
    weight = op.arrays["weight"]
    maximum = int(np.abs(weight.reshape(len(weight), -1).astype(np.int64)).sum(1).max()) * writer.spec(op.inputs[0]).maximum
    accumulator = f"{op.output}/acc"
    writer.producer[accumulator] = Op("conv", op.inputs, accumulator, op.source, op.attrs, {"weight": weight})
    writer.specs[accumulator] = TensorSpec(accumulator, "s32", writer.spec(op.output).shape, maximum, writer.spec(op.output).scale)
    writer.value[op.output] = writer.fire(accumulator, op.arrays["threshold"], maximum, op.output)


def _emit_fire(writer: _Writer, op: Op) -> None:
    writer.value[op.output] = writer.fire(op.inputs[0], op.arrays["threshold"], writer.spec(op.inputs[0]).maximum, op.output)


def _emit_add_fire(writer: _Writer, op: Op) -> None:
    terms = [writer.spec(name) for name in op.inputs]
    multipliers = [op.arrays[f"multiplier{index}"].astype(np.int64) for index in range(len(terms))]
    threshold = op.arrays["threshold"].astype(np.int64)
    reach = [m * term.maximum for m, term in zip(multipliers, terms)]  # the largest |m_t·x_t| per channel
    if len(terms) == 2 and _stepped_add_fire(writer, op, terms, multipliers, threshold):
        return
    anchor = max(range(len(terms)), key=lambda index: (terms[index].kind == "s32", int(reach[index].max())))
    others = [index for index in range(len(terms)) if index != anchor]
    m_anchor, largest = multipliers[anchor], terms[anchor].maximum
    # Rounded: the unit is m_a/2^k per channel, the other terms within TERM_UNITS units and the anchor's
    # (a + bias)·2^k within int32.
    other_reach = np.sum([reach[index] for index in others], axis=0)
    bias = -np.round(threshold / m_anchor).astype(np.int64)  # θ in the anchor's steps, the part its bias holds
    k = np.floor(np.log2(TERM_UNITS * m_anchor / np.maximum(other_reach, 1)))
    k = np.minimum(k, np.floor(np.log2(INT32_MAX / (largest + np.abs(bias) + 1))))
    k = np.clip(k, -30, math.log2(MAX_GAIN))
    unit = m_anchor / 2.0**k
    offset = 1 + np.floor(-threshold / unit - bias * 2.0**k)  # the rest of θ, in units, and the 1 that RELU + MINIMUM compare with
    if np.all(k <= 0):
        # A unit holds whole anchor steps, so the anchor's bias can take the rest too.
        bias, offset = bias + np.round(offset * 2.0**-k).astype(np.int64), np.zeros_like(offset)
    total = writer.accumulator(op.inputs[anchor], 2.0**k, bias)
    for position, index in enumerate(others):
        term = writer.accumulator(op.inputs[index], multipliers[index] / unit, 0)
        total = writer.add(total, term, writer.name(op.output), relu=position == len(others) - 1 and not np.any(offset))
    if np.any(offset):
        constant = writer.graph.constant(f"{op.output}/offset", offset.reshape(1, 1, 1, -1), "int16", writer.graph.scale)
        total = writer.add(total, constant, writer.name(op.output), relu=True)
    writer.value[op.output] = writer.minimum_one(total, op.output)


def _stepped_add_fire(writer: _Writer, op: Op, terms: list[TensorSpec], multipliers: list[np.ndarray], threshold: np.ndarray) -> bool:
    """m_a·a + m_x·x ≥ θ as a ≥ T(x) with T a staircase over the few values of x: exact. False where it does not apply.

    x is the term with the fewest values (at most STEP_LIMIT + 1), a the other;
    T(x) = ⌈(θ − m_x·x)/m_a⌉ needs m_a > 0. A spike map x has one step, its
    height the gain of x; more steps come from ``steps`` and must fit int8.
    """
    spans = [(0, 1) if term.kind == "bits" else (-term.maximum, term.maximum) for term in terms]
    other = min(range(2), key=lambda index: spans[index][1] - spans[index][0])
    anchor = 1 - other
    low, high = spans[other]
    largest, m_anchor = terms[anchor].maximum, multipliers[anchor]
    one_step = high - low == 1
    if not low < high <= low + STEP_LIMIT or largest > (TERM_UNITS if one_step else STEPPED_LARGEST) or np.any(m_anchor <= 0):
        return False
    values = np.arange(low, high + 1, dtype=np.int64)
    # beyond |a| ≤ largest all thresholds act alike
    bounds = np.clip(_ceil_div(threshold[None, :] - multipliers[other][None, :] * values[:, None], m_anchor[None, :]), -largest, largest + 1)
    heights = bounds[:-1] - bounds[1:]  # how far the bound drops as x reaches each next value
    if not one_step and np.abs(heights).max() > 127:
        return False
    total = writer.accumulator(op.inputs[anchor], 1.0, 1 - bounds[0])
    if one_step:
        steps = writer.accumulator(op.inputs[other], heights[0], 0)  # x ∈ {0, 1}: [x ≥ 1] = x
    else:
        steps = writer.steps(op.inputs[other], values[1:], heights, op.output)
    writer.value[op.output] = writer.minimum_one(writer.add(total, steps, writer.name(op.output), relu=True), op.output)
    return True


def _emit_avgpool(writer: _Writer, op: Op) -> None:
    spec = writer.spec(op.output)
    if spec.kind == "s32":
        return  # a pooled accumulator: written by its reader
    if spec.maximum > INT16_MAX:
        raise writer.error(f"its window sums reach {spec.maximum}, beyond int16")
    ones = np.ones((spec.shape[0], *op.attrs["kernel"]), dtype=np.int64)
    writer.value[op.output] = writer.weighted("DEPTHWISE_CONV_2D", op.output, writer.exact(op.inputs[0]), ones, 1.0, 0, op.attrs["stride"], op.attrs["padding"])


def _emit_maxpool(writer: _Writer, op: Op) -> None:
    if writer.spec(op.output).kind == "s32":
        return  # a pooled accumulator: written by its reader
    writer.value[op.output] = writer.pool(op.output, writer.exact(op.inputs[0]), op)  # spike counts are ≥ 0


def _emit_pad(writer: _Writer, op: Op) -> None:
    front, back, top, bottom, left, right = op.attrs["pad"]
    paddings = writer.graph.constant("paddings", [[0, 0], [top, bottom], [left, right], [front, back]], "int32")
    channels, height, width = writer.spec(op.output).shape
    out = writer.graph.activation(op.output, (height, width, channels))
    writer.graph.operator("PAD", [writer.exact(op.inputs[0]), paddings], [out])
    writer.value[op.output] = out


def _emit_slice(writer: _Writer, op: Op) -> None:
    schema = writer.graph.schema
    axis = (3, 1, 2)[op.attrs["axis"]]  # C, H, W -> N×H×W×C
    start, step, count = op.attrs["start"], op.attrs["step"], op.attrs["count"]
    if count < 1:
        raise writer.error("the slice is empty")
    begin, end, strides = np.zeros(4, dtype=np.int32), np.zeros(4, dtype=np.int32), np.ones(4, dtype=np.int32)
    begin[axis], end[axis], strides[axis] = start, start + step * (count - 1) + 1, step
    options = schema.StridedSliceOptionsT()
    options.beginMask = options.endMask = 0b1111 & ~(1 << axis)  # the other axes whole
    bounds = [writer.graph.constant(f"slice_{what}", values, "int32") for what, values in (("begin", begin), ("end", end), ("strides", strides))]
    channels, height, width = writer.spec(op.output).shape
    out = writer.graph.activation(op.output, (height, width, channels))
    writer.graph.operator("STRIDED_SLICE", [writer.exact(op.inputs[0]), *bounds], [out], options)
    writer.value[op.output] = out


def _emit_cat(writer: _Writer, op: Op) -> None:
    schema = writer.graph.schema
    options = schema.ConcatenationOptionsT()
    options.axis = 3
    channels, height, width = writer.spec(op.output).shape
    out = writer.graph.activation(op.output, (height, width, channels))
    writer.graph.operator("CONCATENATION", [writer.exact(name) for name in op.inputs], [out], options)
    writer.value[op.output] = out


def _emit_output(writer: _Writer, op: Op) -> None:
    channels, height, width = writer.spec(op.inputs[0]).shape
    if height * width != 1:
        raise writer.error(f"the logits come from a {channels}×{height}×{width} map, expected a vector")
    if np.any(op.arrays["multiplier"] <= 0):
        raise writer.error("a logit multiplier is not positive")
    bits = _digit_bits(writer, op)
    if bits:
        _exact_logits(writer, op, bits)
    else:
        _int16_logits(writer, op)


def _logit_weights(writer: _Writer, op: Op) -> np.ndarray:
    """The last conv's weights at the logits' scale: multiplier[c]·w[c]."""
    weight = writer.producer[op.inputs[0]].arrays["weight"].astype(np.int64)
    return weight * op.arrays["multiplier"].astype(np.int64).reshape(-1, 1, 1, 1)


def _digit_bits(writer: _Writer, op: Op) -> int:
    """Bits per digit of exact logits, the most for which every digit's conv sums within int16; 0 if none does."""
    conv = writer.producer.get(op.inputs[0])
    if conv is None or conv.kind != "conv" or conv.inputs[0] not in writer.value:
        return 0
    weight, largest = _logit_weights(writer, op), max(writer.spec(conv.inputs[0]).maximum, 1)
    for bits in range(7, 0, -1):  # a digit is an int8 code
        digits = signed_digits(weight, bits)
        if max(int(np.abs(digit.reshape(len(digit), -1)).sum(1).max()) for digit in digits) * largest <= INT16_MAX:
            return bits
    return 0


def _exact_logits(writer: _Writer, op: Op, bits: int) -> None:
    """int64 logits Σ_j 2^(bits·j)·(Σ d_j·x) + offset by Horner's rule, ×2^bits being ``bits`` doublings."""
    conv = writer.producer[op.inputs[0]]
    source = writer.value[conv.inputs[0]]
    total = None
    for place, digit in reversed(list(enumerate(signed_digits(_logit_weights(writer, op), bits)))):
        name = f"{op.output}/digit{place}"
        part = writer.cast_int64(writer.weighted("CONV_2D", name, source, digit, 1.0, 0, conv.attrs["stride"], conv.attrs["padding"]), f"{name}/int64")
        if total is not None:
            for _ in range(bits):
                total = writer.add_int64(total, total, writer.name(name))
            part = writer.add_int64(total, part, writer.name(name))
        total = part
    offset = writer.graph.constant(f"{op.output}/offset", op.arrays["offset"].reshape(1, 1, 1, -1), "int64")
    total = writer.add_int64(total, offset, writer.name(op.output))
    writer.logits = writer.flatten(total, LOGITS, "int64", writer.program.output_scale)


def _int16_logits(writer: _Writer, op: Op) -> None:
    """int16 logits ⌊(acc + ⌊offset/multiplier⌉)·multiplier/D + ½⌋, D = largest |logit| / 32767, as float32."""
    multiplier, offset = op.arrays["multiplier"].astype(np.int64), op.arrays["offset"].astype(np.int64)
    unit = float((multiplier * writer.spec(op.inputs[0]).maximum + np.abs(offset)).max()) / INT16_MAX
    scale = float(np.float32(writer.program.output_scale * unit))
    values = writer.accumulator(op.inputs[0], multiplier / unit, np.round(offset / multiplier).astype(np.int64), out_scale=scale)
    flat = writer.flatten(values, f"{LOGITS}/int16", "int16", scale)
    writer.logits = writer.graph.tensor(LOGITS, (1, len(multiplier)), "float32")
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
    """The program as a 16x8-quantized TFLite model; the module docstring gives each op's form.

    Input ``images``: float32 1×H×W×C, normalised as the model expects (the
    batch can be resized). Output ``logits``: int64 1×classes whose
    quantization scale is the real value of one step (float32 where the
    logits could not be exact). ``stamp`` goes into the model's description:
    "Generated by <stamp>. Do not edit."
    """
    writer = _Writer(program)
    channels, height, width = program.input_shape
    images = writer.graph.tensor(IMAGES, (1, height, width, channels), "float32")
    writer.graph.tensors[images].shapeSignature = [-1, height, width, channels]
    writer.value[program.input] = writer.graph.activation(program.input, (height, width, channels))
    writer.graph.operator("QUANTIZE", [images], [writer.value[program.input]])
    for op in program.ops:
        emitter = EMITTERS.get(op.kind)
        if emitter is None:
            raise ExportError(f"tflite: op {op.kind!r} of node {op.source!r} has no TFLite form; known ops: {', '.join(EMITTERS)}")
        writer.op = op
        emitter(writer, op)
    if writer.logits is None:
        raise ExportError("tflite: the program has no output op")
    return writer.graph.serialize([images], [writer.logits], f"Generated by {stamp or 'edgesnn'}. Do not edit.")


# ---------------------------------------------------------------------------
# Runner


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise ExportError("tflite: running a TFLite file needs ai-edge-litert (or tflite-runtime)") from None
    return Interpreter


def run_tflite(data: bytes, images: np.ndarray, batch: int = 1, threads: int = 1) -> np.ndarray:
    """Real-valued logits (float64, N×classes) of a TFLite model on N×C×H×W float32 images, normalised as the model expects.

    The images are transposed to the model's N×H×W×C and run ``batch`` at a
    time. Integer logits are multiplied by their tensor's scale.
    """
    if batch < 1 or threads < 1:
        raise ExportError(f"tflite: batch {batch} and threads {threads} must be at least 1")
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ExportError(f"tflite: images must be N×C×H×W, got shape {images.shape}")
    interpreter = _interpreter_class()(model_content=data, num_threads=threads)
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    expected = tuple(int(v) for v in source["shape"][1:])
    images = np.ascontiguousarray(np.transpose(images, (0, 2, 3, 1)))
    if tuple(images.shape[1:]) != expected:
        raise ExportError(f"tflite: images are {'×'.join(map(str, images.shape[1:]))} (H×W×C), the model expects {'×'.join(map(str, expected))}")
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
    classes = int(target["shape"][-1])
    logits = np.concatenate(results).reshape(len(images), classes) if results else np.zeros((0, classes))
    if np.issubdtype(logits.dtype, np.integer):
        return logits.astype(np.float64) * float(target["quantization"][0])
    return logits.astype(np.float64)


__all__ = ["EMITTERS", "IMAGES", "LOGITS", "OP_VERSIONS", "representable_gain", "run_tflite", "signed_digits", "tflite_bytes"]
