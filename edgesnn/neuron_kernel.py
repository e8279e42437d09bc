"""A compiled CPU kernel for the one-timestep neuron that privatize and binarize train.

At T=1 a ``TrainableIF`` with its current norm is, per channel c,

    y = γ·(I − μ)/√(σ² + ε) + β,   v = y + θ·m₀,   s = H(v − θ),   out = s·a

(μ, σ² the batch's mean and biased variance, m₀ the initial membrane, a the
spike amplitude), trained through the triangular surrogate
∂s/∂v = max(0, w − |v/θ − 1|)/(w²·θ). As a PyTorch graph that is some twenty
elementwise passes over the current forward and backward, a third of a
bfloat16 training step on 2 CPU cores. ``neuron_kernel.c`` does it in two passes
forward (moments, spikes) and two backward (per-channel sums, input
gradient), reading bfloat16 currents as they come out of the convolutions.

The C file is compiled on first use with the system's C compiler (``CC``,
else ``cc``) and kept per machine as ``native`` describes (``EDGESNN_CACHE_DIR``,
else ``~/.cache/edgesnn``; the name hashes the source, the flags, the compiler
and the CPU: the build targets this CPU). Where no compiler is found or it
fails, ``library()`` is None and training takes the PyTorch graph, which
computes the same function; so does ``EDGESNN_NEURON_KERNEL=python``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess
from pathlib import Path

import torch

from . import native

SOURCE = Path(__file__).with_name("neuron_kernel.c")
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-pthread", "-fno-math-errno")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_FLOATS = ctypes.POINTER(ctypes.c_float)
_DOUBLES = ctypes.POINTER(ctypes.c_double)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel (built once per source, flags, compiler and CPU), or None where it cannot be had or is switched off."""
    if os.environ.get("EDGESNN_NEURON_KERNEL", "").lower() == "python":
        return None
    compiler = native.compiler()
    if compiler is None:
        return None

    def build(path: str) -> bool:
        try:
            subprocess.run([compiler, *FLAGS, "-o", path, str(SOURCE)], check=True, capture_output=True, timeout=120)
        except subprocess.SubprocessError:
            return False
        return True

    kernel = native.load("neuron", compiler, (SOURCE.read_bytes(), " ".join(FLAGS)), build)
    return None if kernel is None else _declare(kernel)


def _declare(kernel: ctypes.CDLL) -> ctypes.CDLL:
    """``kernel`` with its functions' argument types declared."""
    pointer, size, number = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    kernel.esnn_neuron_moments.argtypes = [number, pointer, size, size, number, _DOUBLES]
    kernel.esnn_neuron_forward.argtypes = [number, pointer, size, size, _FLOATS, _FLOATS, _FLOATS, _FLOATS, number, pointer]
    kernel.esnn_neuron_backward_sums.argtypes = [number, pointer, pointer, size, size, _FLOATS, _FLOATS, _FLOATS, _FLOATS, ctypes.c_float, number, _DOUBLES]
    kernel.esnn_neuron_backward_input.argtypes = [number, pointer, pointer, size, size, _FLOATS, _FLOATS, _FLOATS, _FLOATS, ctypes.c_float, _FLOATS, _FLOATS, _FLOATS, number, pointer]
    kernel.esnn_difference_sums.argtypes = [number, pointer, pointer, size, size, number, _DOUBLES]
    kernel.esnn_difference_scaled.argtypes = [number, pointer, pointer, size, size, ctypes.c_float, number, pointer]
    for function in (kernel.esnn_neuron_moments, kernel.esnn_neuron_forward, kernel.esnn_neuron_backward_sums, kernel.esnn_neuron_backward_input, kernel.esnn_difference_sums, kernel.esnn_difference_scaled):
        function.restype = number
    return kernel


def mode(device: str = "cpu", ranks: int = 1) -> str:
    """What trains the one-timestep neurons on ``device`` with ``ranks`` torchrun processes: "compiled" (this kernel) or "pytorch"."""
    return "compiled" if torch.device(device).type == "cpu" and ranks == 1 and library() is not None else "pytorch"


def _layout(tensor: torch.Tensor) -> torch.memory_format | None:
    """The memory format in which ``tensor`` is rows × channels (channels last), or None if it is in neither."""
    if tensor.dim() == 2 and tensor.is_contiguous():
        return torch.contiguous_format
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def applies(current: torch.Tensor) -> bool:
    """Whether the kernel can take ``current``: on the CPU, float32 or bfloat16, B×C or channels-last B×C×H×W, and compiled."""
    return current.device.type == "cpu" and current.dtype in _DTYPES and _layout(current) is not None and current.numel() > 0 and library() is not None


def applies_pair(student: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether ``MatchingDistance`` can take the pair: both as ``applies`` requires, of one shape, dtype and layout."""
    return applies(student) and student.shape == reference.shape and student.dtype == reference.dtype and student.stride() == reference.stride() and reference.device.type == "cpu"


def _floats(tensor: torch.Tensor):
    return ctypes.cast(tensor.data_ptr(), _FLOATS)


def _per_channel(tensor: torch.Tensor, channels: int) -> torch.Tensor:
    return tensor.detach().float().expand(channels).contiguous()


def _reduce(per_channel: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A per-channel gradient back to its parameter's shape (summed for a scalar)."""
    return per_channel if per_channel.shape == shape else per_channel.sum().reshape(shape)


def _check(status: int, what: str) -> None:
    if status != 0:
        raise MemoryError(f"neuron kernel: {what} ran out of memory or threads")


class FusedNeuron(torch.autograd.Function):
    """The one-timestep neuron above through the compiled kernel: returns (out, μ, σ²) (μ, σ² empty without a norm).

    Inputs: the current (B×C or channels-last B×C×H×W), θ and the amplitude a (each C values or a scalar),
    the norm's γ and β (C) or None for no norm, m₀, w and ε.
    """

    @staticmethod
    def forward(ctx, current, theta, amplitude, weight, bias, initial_membrane: float, width: float, eps: float):
        kernel = library()
        channels = current.shape[1]
        rows = current.numel() // channels
        dtype = _DTYPES[current.dtype]
        threads = torch.get_num_threads()
        theta_c = _per_channel(theta, channels)
        if weight is not None:
            sums = torch.empty(2, channels, dtype=torch.float64)
            _check(kernel.esnn_neuron_moments(dtype, current.data_ptr(), rows, channels, threads, ctypes.cast(sums.data_ptr(), _DOUBLES)), "moments")
            mean = (sums[0] / rows).float()
            var = (sums[1] / rows - (sums[0] / rows).square()).clamp_min(0).float()
            inverse_std = (var + eps).rsqrt()
            scale = weight.detach().float() * inverse_std
            shift = bias.detach().float() - mean * scale + theta_c * initial_membrane
        else:
            mean = var = inverse_std = torch.empty(0)
            scale = torch.ones(channels)
            shift = theta_c * initial_membrane
        amplitude_c = _per_channel(amplitude, channels)
        out = torch.empty_like(current)
        _check(kernel.esnn_neuron_forward(dtype, current.data_ptr(), rows, channels, _floats(scale), _floats(shift), _floats(theta_c), _floats(amplitude_c), threads, out.data_ptr()), "forward")
        ctx.save_for_backward(current, theta_c, amplitude_c, scale, shift, mean, inverse_std)
        ctx.norm = weight is not None
        ctx.initial_membrane, ctx.width = initial_membrane, width
        ctx.theta_shape, ctx.amplitude_shape = theta.shape, amplitude.shape
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_var):
        current, theta_c, amplitude_c, scale, shift, mean, inverse_std = ctx.saved_tensors
        kernel = library()
        channels = current.shape[1]
        rows = current.numel() // channels
        dtype = _DTYPES[current.dtype]
        threads = torch.get_num_threads()
        grad = grad.to(current.dtype).contiguous(memory_format=_layout(current))
        sums = torch.empty(4, channels, dtype=torch.float64)
        _check(kernel.esnn_neuron_backward_sums(dtype, current.data_ptr(), grad.data_ptr(), rows, channels, _floats(scale), _floats(shift), _floats(theta_c), _floats(amplitude_c), ctx.width, threads, ctypes.cast(sums.data_ptr(), _DOUBLES)), "backward")
        sum_membrane, sum_input, sum_potential, sum_spike = sums.float()
        # s = H(v/θ − 1) and v = y + θ·m₀: ∂L/∂θ = −Σ g_v·v/θ + m₀·Σ g_v.
        grad_theta = _reduce(-sum_potential / theta_c + ctx.initial_membrane * sum_membrane, ctx.theta_shape)
        grad_amplitude = _reduce(sum_spike, ctx.amplitude_shape)
        if ctx.norm:
            # Batch norm backward with ŷ = (I − μ)/σ̂: ∂L/∂γ = Σ g_v·ŷ, ∂L/∂β = Σ g_v, and
            # ∂L/∂I = γ/σ̂ · (g_v − Σg_v/M − ŷ·Σ(g_v·ŷ)/M), written a·g_v + b·I + d per channel.
            centred = sum_input - mean * sum_membrane  # Σ g_v·(I − μ)
            grad_weight, grad_bias = inverse_std * centred, sum_membrane
            a = scale
            b = -scale * inverse_std.square() * centred / rows
            d = -scale * sum_membrane / rows - b * mean
        else:
            grad_weight = grad_bias = None
            a, b, d = torch.ones(channels), torch.zeros(channels), torch.zeros(channels)
        grad_current = torch.empty_like(current)
        _check(kernel.esnn_neuron_backward_input(dtype, current.data_ptr(), grad.data_ptr(), rows, channels, _floats(scale), _floats(shift), _floats(theta_c), _floats(amplitude_c), ctx.width, _floats(a), _floats(b), _floats(d), threads, grad_current.data_ptr()), "input gradient")
        return grad_current, grad_theta, grad_amplitude, grad_weight, grad_bias, None, None, None


class MatchingDistance(torch.autograd.Function):
    """(mean (I − R)², mean R²) of a student current I and its reference R, in one pass; the gradient flows to I only.

    ``privatize._CurrentMatching`` divides the first by the second (its loss term for one layer). Sums in double.
    """

    @staticmethod
    def forward(ctx, student, reference):
        kernel = library()
        channels = student.shape[1]
        rows = student.numel() // channels
        sums = torch.empty(2, channels, dtype=torch.float64)
        _check(kernel.esnn_difference_sums(_DTYPES[student.dtype], student.data_ptr(), reference.data_ptr(), rows, channels, torch.get_num_threads(), ctypes.cast(sums.data_ptr(), _DOUBLES)), "matching")
        ctx.save_for_backward(student, reference)
        mean_square = (sums.sum(1) / student.numel()).float()
        ctx.mark_non_differentiable(mean_square[1])
        return mean_square[0].clone(), mean_square[1].clone()

    @staticmethod
    def backward(ctx, grad, _grad_reference):
        student, reference = ctx.saved_tensors
        kernel = library()
        channels = student.shape[1]
        grad_student = torch.empty_like(student)
        scale = 2 * float(grad) / student.numel()
        _check(kernel.esnn_difference_scaled(_DTYPES[student.dtype], student.data_ptr(), reference.data_ptr(), student.numel() // channels, channels, scale, torch.get_num_threads(), grad_student.data_ptr()), "matching gradient")
        return grad_student, None
