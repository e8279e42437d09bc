"""Stage ``capture``: trace the ANN with ``torch.export`` and map it onto edgesnn's graph.

Every traced ATen op is looked up in ``CAPTURE_TABLE`` (ATen op name ->
translator). An op that is not there, or a use of a supported op that an SNN
cannot express (negative padding, hardtanh not starting at 0, ...), fails at
once with the node, the op, the module and the line of the user's code. The
captured graph is then run beside the original model on random inputs of a
different batch size; a difference means the trace missed something (data-
dependent control flow, a batch size baked into a view) and is an error too.

Parameter-only computations (a transposed weight, a reshaped bias) are folded
into constants while tracing, so decomposed exports (``addmm`` with ``t(W)``)
map onto the same ``linear`` node as ``nn.Linear``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .artifacts import LoadedModel, Teacher
from .errors import CaptureError
from .graph import Graph, GraphNetwork, Node

EXAMPLE_BATCH = 2  # batch size of the traced example input
CHECK_BATCH = 3  # a different batch size for the equivalence check


@dataclass(frozen=True)
class CaptureConfig:
    """How the model is traced and checked."""

    tolerance: float = 1e-4  # max |graph − model| allowed, relative to 1 + max |model output|
    seed: int = 0  # seed of the random example and check inputs


class _Alias:
    """A traced value that is another node's output unchanged (dropout, clone, ...)."""

    def __init__(self, name: str):
        self.name = name


class _Context:
    """State shared by translators while one exported graph is walked."""

    def __init__(self, exported: torch.export.ExportedProgram, batch: int):
        self.exported = exported
        self.batch = batch  # batch size of the traced example
        self.values: dict[str, Any] = {}  # fx node name -> node name (str), constant tensor, or tuple
        self.nodes: list[Node] = []
        self.used_names: set[str] = set()

    # -- argument helpers ---------------------------------------------------

    def value(self, arg: Any) -> Any:
        """An fx argument as a graph node name, a constant tensor, or a plain Python value."""
        if isinstance(arg, torch.fx.Node):
            return self.values[arg.name]
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.value(a) for a in arg)
        return arg

    def tensor_input(self, fx_node: torch.fx.Node, position: int = 0) -> str:
        value = self.value(fx_node.args[position])
        if not isinstance(value, str):
            raise self.error(fx_node, "its input must be a tensor computed from the network input")
        return value

    def constant(self, fx_node: torch.fx.Node, arg: Any, what: str) -> torch.Tensor | None:
        if arg is None:
            return None
        value = self.value(arg)
        if not isinstance(value, torch.Tensor):
            raise self.error(fx_node, f"its {what} must be a parameter, not a value computed from the input")
        return value.detach().to(torch.float32).clone()

    def shape(self, fx_node: torch.fx.Node) -> tuple[int, ...]:
        value = fx_node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            raise self.error(fx_node, "produces no single tensor")
        if value.dim() == 0 or value.shape[0] != self.batch:
            raise self.error(fx_node, f"mixes samples of the batch (output shape {tuple(value.shape)} for a batch of {self.batch})")
        return tuple(int(s) for s in value.shape[1:])

    def input_shape(self, fx_node: torch.fx.Node, position: int = 0) -> tuple[int, ...]:
        return self.shape(fx_node.args[position])

    # -- building -----------------------------------------------------------

    def add(self, fx_node: torch.fx.Node, op: str, inputs: tuple[str, ...], attrs: dict | None = None, params: dict | None = None, output: int | None = None) -> str:
        """Append a node; ``output`` picks the element of an op that returns a tuple."""
        shape = self.shape(fx_node) if output is None else tuple(int(s) for s in fx_node.meta["val"][output].shape[1:])
        name = self._name(fx_node, op)
        self.nodes.append(Node(name, op, inputs, attrs or {}, {k: v for k, v in (params or {}).items() if v is not None}, shape, source_of(fx_node)))
        return name

    def _name(self, fx_node: torch.fx.Node, op: str) -> str:
        path, kind = _innermost_module(fx_node)
        owns = {"conv": "Conv", "linear": "Linear", "batchnorm": "BatchNorm"}.get(op)
        if owns and path and owns in kind:
            name = path
        else:
            name = f"{path}.{fx_node.name}" if path else fx_node.name
        while name in self.used_names:
            name = f"{name}_{fx_node.name}"
        self.used_names.add(name)
        return name

    def error(self, fx_node: torch.fx.Node, problem: str) -> CaptureError:
        return CaptureError(f"node {fx_node.name!r} ({_op_name(fx_node)}) {where(fx_node)}: {problem}")


def _innermost_module(fx_node: torch.fx.Node) -> tuple[str, str]:
    stack = fx_node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, kind = list(stack.values())[-1]
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    return str(path), kind.rsplit(".", 1)[-1]


def source_of(fx_node: torch.fx.Node) -> str:
    """``file.py:line`` of the user's code that called the op (frames inside torch skipped)."""
    trace = fx_node.meta.get("stack_trace") or ""
    location = ""
    for line in trace.splitlines():
        line = line.strip()
        if line.startswith("File ") and "/torch/" not in line:
            try:
                path = line.split('"')[1]
                number = line.split("line ")[1].split(",")[0]
                location = f"{path}:{number}"
            except IndexError:
                continue
    return location


def where(fx_node: torch.fx.Node) -> str:
    path, kind = _innermost_module(fx_node)
    module = f"in module '{path}' ({kind})" if path else f"in the top-level module ({kind})" if kind else "in the model"
    location = source_of(fx_node)
    return f"{module} at {location}" if location else module


def _op_name(fx_node: torch.fx.Node) -> str:
    target = fx_node.target
    if target is operator.getitem:
        return "getitem"
    return str(target)


def _pair(value: Any, default: int) -> tuple[int, int]:
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        return (default, default)
    if isinstance(value, int):
        return (value, value)
    values = tuple(int(v) for v in value)
    return values * 2 if len(values) == 1 else values


def _arg(fx_node: torch.fx.Node, position: int, name: str, default: Any) -> Any:
    if len(fx_node.args) > position:
        return fx_node.args[position]
    return fx_node.kwargs.get(name, default)


# ---------------------------------------------------------------------------
# Translators: one per family of ATen ops. Each returns the node name (or an
# _Alias) that stands for the traced value.

Translator = Callable[[_Context, torch.fx.Node], Any]


def _conv(ctx: _Context, n: torch.fx.Node) -> str:
    x = ctx.tensor_input(n)
    weight = ctx.constant(n, n.args[1], "weight")
    bias = ctx.constant(n, _arg(n, 2, "bias", None), "bias")
    if weight.dim() != 4:
        raise ctx.error(n, f"only 2-D convolutions are supported (weight has {weight.dim()} dimensions)")
    if n.target in (torch.ops.aten.convolution.default,):
        if _arg(n, 6, "transposed", False):
            raise ctx.error(n, "transposed convolutions are not supported")
        stride, padding, dilation, groups = n.args[3], n.args[4], n.args[5], n.args[8]
    else:
        stride, padding, dilation, groups = _arg(n, 3, "stride", 1), _arg(n, 4, "padding", 0), _arg(n, 5, "dilation", 1), _arg(n, 6, "groups", 1)
    dilation = _pair(dilation, 1)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif all(k % 2 == 1 for k in weight.shape[2:]):
            padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, weight.shape[2:]))
        else:
            raise ctx.error(n, "padding='same' with an even kernel pads asymmetrically, which is not supported")
    attrs = {"stride": _pair(stride, 1), "padding": _pair(padding, 0), "dilation": dilation, "groups": int(groups)}
    return ctx.add(n, "conv", (x,), attrs, {"weight": weight, "bias": bias})


def _linear(ctx: _Context, n: torch.fx.Node) -> str:
    x = ctx.tensor_input(n)
    if len(ctx.input_shape(n)) != 1:
        raise ctx.error(n, f"linear layers must see flat features per sample, found shape {ctx.input_shape(n)}")
    weight = ctx.constant(n, n.args[1], "weight")
    bias = ctx.constant(n, _arg(n, 2, "bias", None), "bias")
    return ctx.add(n, "linear", (x,), {}, {"weight": weight, "bias": bias})


def _matmul(ctx: _Context, n: torch.fx.Node) -> str:
    """``mm(x, Wᵀ)``, ``matmul(x, Wᵀ)`` and ``addmm(b, x, Wᵀ)`` as decomposed linear layers."""
    if n.target is torch.ops.aten.addmm.default:
        bias_arg, x_arg, weight_arg = n.args[0], n.args[1], n.args[2]
        if _arg(n, 3, "beta", 1) != 1 or _arg(n, 4, "alpha", 1) != 1:
            raise ctx.error(n, "addmm with beta or alpha other than 1 is not supported")
    else:
        bias_arg, x_arg, weight_arg = None, n.args[0], n.args[1]
    x = ctx.value(x_arg)
    if not isinstance(x, str):
        raise ctx.error(n, "the left operand must be computed from the network input")
    weight_t = ctx.constant(n, weight_arg, "right operand")
    bias = ctx.constant(n, bias_arg, "bias")
    if weight_t.dim() != 2 or len(ctx.input_shape(n, 1 if bias_arg is not None else 0)) != 1:
        raise ctx.error(n, "only (batch×in) @ (in×out) products are supported")
    return ctx.add(n, "linear", (x,), {}, {"weight": weight_t.t().contiguous(), "bias": bias})


def _batchnorm(ctx: _Context, n: torch.fx.Node) -> str:
    x = ctx.tensor_input(n)
    if n.target is torch.ops.aten.batch_norm.default:
        weight, bias, mean, var = n.args[1:5]
        training, eps = _arg(n, 5, "training", False), _arg(n, 7, "eps", 1e-5)
    else:  # _native_batch_norm_legit_no_training(x, w, b, mean, var, momentum, eps)
        weight, bias, mean, var = n.args[1:5]
        training, eps = False, _arg(n, 6, "eps", 1e-5)
    if training:
        raise ctx.error(n, "BatchNorm runs in training mode (batch statistics); call model.eval() or use running stats")
    params = {
        "weight": ctx.constant(n, weight, "weight"),
        "bias": ctx.constant(n, bias, "bias"),
        "running_mean": ctx.constant(n, mean, "running mean"),
        "running_var": ctx.constant(n, var, "running variance"),
    }
    if params["running_mean"] is None or params["running_var"] is None:
        raise ctx.error(n, "BatchNorm without running statistics (track_running_stats=False) is not supported")
    if len(ctx.input_shape(n)) not in (1, 3):
        raise ctx.error(n, f"BatchNorm over features of shape {ctx.input_shape(n)} is not supported")
    if n.target is torch.ops.aten.batch_norm.default:
        return ctx.add(n, "batchnorm", (x,), {"eps": float(eps)}, params)
    return (ctx.add(n, "batchnorm", (x,), {"eps": float(eps)}, params, output=0), None, None)  # type: ignore[return-value]


def _relu(ctx: _Context, n: torch.fx.Node) -> str:
    target = n.target
    ceiling: float | None = None
    if target in (torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default):
        low, high = _arg(n, 1, "min_val", -1.0), _arg(n, 2, "max_val", 1.0)
        if low != 0:
            raise ctx.error(n, f"hardtanh({low}, {high}) is not a clipped ReLU: only hardtanh(0, max) maps onto spiking neurons")
        ceiling = float(high)
    elif target in (torch.ops.aten.relu6.default,):
        ceiling = 6.0
    elif target in (torch.ops.aten.clamp.default, torch.ops.aten.clamp_.default, torch.ops.aten.clamp_min.default, torch.ops.aten.clamp_min_.default):
        low = _arg(n, 1, "min", None)
        high = _arg(n, 2, "max", None) if target in (torch.ops.aten.clamp.default, torch.ops.aten.clamp_.default) else None
        if low is None or isinstance(low, torch.fx.Node) or float(low) != 0.0:
            raise ctx.error(n, f"clamp(min={low}, max={high}) is not a clipped ReLU: the lower bound must be 0")
        if isinstance(high, torch.fx.Node):
            raise ctx.error(n, "clamp with a tensor bound is not supported")
        ceiling = None if high is None else float(high)
    if ceiling is not None and ceiling <= 0:
        raise ctx.error(n, f"a clipped ReLU with ceiling {ceiling} never fires")
    return ctx.add(n, "relu", (ctx.tensor_input(n),), {"ceiling": ceiling})


def _avgpool(ctx: _Context, n: torch.fx.Node) -> str:
    kernel = _pair(n.args[1], 1)
    stride = _pair(_arg(n, 2, "stride", None), 0)
    if stride == (0, 0):
        stride = kernel
    if _arg(n, 6, "divisor_override", None) is not None:
        raise ctx.error(n, "avg_pool2d with divisor_override is not supported")
    attrs = {
        "kernel": kernel,
        "stride": stride,
        "padding": _pair(_arg(n, 3, "padding", 0), 0),
        "ceil_mode": bool(_arg(n, 4, "ceil_mode", False)),
        "count_include_pad": bool(_arg(n, 5, "count_include_pad", True)),
    }
    return ctx.add(n, "avgpool", (ctx.tensor_input(n),), attrs)


def _maxpool(ctx: _Context, n: torch.fx.Node) -> Any:
    kernel = _pair(n.args[1], 1)
    stride = _pair(_arg(n, 2, "stride", None), 0)
    if stride == (0, 0):
        stride = kernel
    attrs = {
        "kernel": kernel,
        "stride": stride,
        "padding": _pair(_arg(n, 3, "padding", 0), 0),
        "dilation": _pair(_arg(n, 4, "dilation", 1), 1),
        "ceil_mode": bool(_arg(n, 5, "ceil_mode", False)),
    }
    if n.target is torch.ops.aten.max_pool2d_with_indices.default:
        return (ctx.add(n, "maxpool", (ctx.tensor_input(n),), attrs, output=0), None)
    return ctx.add(n, "maxpool", (ctx.tensor_input(n),), attrs)


def _adaptive_avgpool(ctx: _Context, n: torch.fx.Node) -> str:
    size = _pair(n.args[1], 1)
    return ctx.add(n, "adaptive_avgpool", (ctx.tensor_input(n),), {"output_size": size})


def _mean(ctx: _Context, n: torch.fx.Node) -> str:
    rank = len(ctx.input_shape(n)) + 1
    dims = _arg(n, 1, "dim", None)
    dims = {d % rank for d in (dims if isinstance(dims, (list, tuple)) else [dims])} if dims is not None else set()
    if rank != 4 or dims != {2, 3}:
        raise ctx.error(n, f"mean over dimensions {sorted(dims)} is not supported (only the spatial mean over (2, 3) of N×C×H×W)")
    return ctx.add(n, "global_mean", (ctx.tensor_input(n),), {"keepdim": bool(_arg(n, 2, "keepdim", False))})


def _reshape(ctx: _Context, n: torch.fx.Node) -> Any:
    x = ctx.tensor_input(n)
    if ctx.shape(n) == ctx.input_shape(n):
        return _Alias(x)
    return ctx.add(n, "reshape", (x,))


def _add(ctx: _Context, n: torch.fx.Node) -> Any:
    left, right = ctx.value(n.args[0]), ctx.value(n.args[1])
    if _arg(n, 2, "alpha", 1) != 1:
        raise ctx.error(n, "add with alpha other than 1 is not supported")
    if isinstance(left, str) and isinstance(right, str):
        return ctx.add(n, "add", (left, right))
    tensor, other = (left, right) if isinstance(left, str) else (right, left)
    if isinstance(tensor, str) and isinstance(other, (int, float)) and other == 0:
        return _Alias(tensor)
    raise ctx.error(n, "only the sum of two tensors from the network (a residual add) is supported, not the addition of a constant")


def _cat(ctx: _Context, n: torch.fx.Node) -> str:
    parts = ctx.value(n.args[0])
    if not all(isinstance(p, str) for p in parts):
        raise ctx.error(n, "concatenation with a constant tensor is not supported")
    rank = len(ctx.shape(n)) + 1
    dim = int(_arg(n, 1, "dim", 0)) % rank
    if dim == 0:
        raise ctx.error(n, "concatenation along the batch dimension is not supported")
    return ctx.add(n, "cat", tuple(parts), {"dim": dim})


def _pad(ctx: _Context, n: torch.fx.Node) -> Any:
    x = ctx.tensor_input(n)
    pad = [int(p) for p in n.args[1]]
    if n.target is torch.ops.aten.pad.default:
        mode, value = _arg(n, 2, "mode", "constant"), _arg(n, 3, "value", None)
    else:  # constant_pad_nd(x, pad, value=0)
        mode, value = "constant", _arg(n, 2, "value", 0)
    if mode != "constant":
        raise ctx.error(n, f"{mode!r} padding is not supported (only zero padding)")
    if value not in (None, 0, 0.0):
        raise ctx.error(n, f"padding with value {value} is not supported (only zero padding)")
    if any(p < 0 for p in pad):
        raise ctx.error(n, "negative padding is not supported")
    rank = len(ctx.input_shape(n)) + 1
    if len(pad) > 2 * (rank - 1) and any(pad[2 * (rank - 1) :]):
        raise ctx.error(n, "padding the batch dimension is not supported")
    if not any(pad):
        return _Alias(x)
    return ctx.add(n, "pad", (x,), {"pad": tuple(pad[: 2 * (rank - 1)])})


def _slice(ctx: _Context, n: torch.fx.Node) -> Any:
    x = ctx.tensor_input(n)
    rank = len(ctx.input_shape(n)) + 1
    dim = int(_arg(n, 1, "dim", 0)) % rank
    if ctx.shape(n) == ctx.input_shape(n) and _arg(n, 4, "step", 1) == 1:
        return _Alias(x)
    if dim == 0:
        raise ctx.error(n, "slicing the batch dimension is not supported")
    size = ctx.input_shape(n)[dim - 1]
    start = _arg(n, 2, "start", None)
    end = _arg(n, 3, "end", None)
    step = int(_arg(n, 4, "step", 1))
    start = 0 if start is None else int(start)
    end = size if end is None else min(int(end), size)
    return ctx.add(n, "slice", (x,), {"dim": dim, "start": start, "end": end, "step": step})


def _identity(ctx: _Context, n: torch.fx.Node) -> Any:
    if n.target is torch.ops.aten._to_copy.default and n.kwargs.get("dtype", torch.float32) != torch.float32:
        raise ctx.error(n, f"casting to {n.kwargs['dtype']} is not supported (the network must stay float32)")
    value = ctx.value(n.args[0])
    if n.target is torch.ops.aten.native_dropout.default:
        return (value, None)
    return _Alias(value) if isinstance(value, str) else value


def _getitem(ctx: _Context, n: torch.fx.Node) -> Any:
    container = ctx.value(n.args[0])
    index = n.args[1]
    if isinstance(container, tuple) and index != 0 and not n.users:
        return None  # an unused secondary output (BatchNorm's saved statistics, pooling indices)
    if not isinstance(container, tuple) or index != 0:
        raise ctx.error(n, f"only the first output of a multi-output op can be used (found index {index})")
    return _Alias(container[0]) if isinstance(container[0], str) else container[0]


def _ops(*names: str) -> list[Any]:
    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        found.append(getattr(getattr(torch.ops.aten, packet), overload or "default"))
    return found


def _table() -> dict[Any, Translator]:
    families: list[tuple[list[str], Translator]] = [
        (["conv2d", "conv2d.padding", "convolution"], _conv),
        (["linear"], _linear),
        (["addmm", "mm", "matmul"], _matmul),
        (["batch_norm", "_native_batch_norm_legit_no_training"], _batchnorm),
        (["relu", "relu_", "relu6", "hardtanh", "hardtanh_", "clamp", "clamp_", "clamp_min", "clamp_min_"], _relu),
        (["avg_pool2d"], _avgpool),
        (["max_pool2d", "max_pool2d_with_indices"], _maxpool),
        (["adaptive_avg_pool2d", "_adaptive_avg_pool2d"], _adaptive_avgpool),
        (["mean.dim"], _mean),
        (["view", "reshape", "_unsafe_view", "flatten.using_ints", "squeeze.dim", "squeeze.dims", "squeeze", "unsqueeze"], _reshape),
        (["add.Tensor", "add_.Tensor", "add.Scalar"], _add),
        (["cat"], _cat),
        (["pad", "constant_pad_nd"], _pad),
        (["slice.Tensor"], _slice),
        (["dropout", "dropout_", "feature_dropout", "alpha_dropout", "native_dropout", "clone", "contiguous", "alias", "detach", "_to_copy", "lift_fresh_copy"], _identity),
    ]
    table: dict[Any, Translator] = {operator.getitem: _getitem}
    for names, translator in families:
        for op in _ops(*names):
            if op in table:
                raise RuntimeError(f"capture table: {op} registered twice")
            table[op] = translator
    return table


CAPTURE_TABLE: dict[Any, Translator] = _table()


def supported_ops() -> list[str]:
    """The ATen ops capture understands, for messages and documentation."""
    return sorted({str(op).replace("aten.", "").replace(".default", "") for op in CAPTURE_TABLE if op is not operator.getitem})


# ---------------------------------------------------------------------------


def static_batch(module: nn.Module) -> int | None:
    """The only batch size a module accepts, when it is an already exported program."""
    if not isinstance(module, torch.fx.GraphModule):
        return None
    for node in module.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor) and value.dim() == 4 and isinstance(value.shape[0], int):
            return int(value.shape[0])
    return None


def export_model(module: nn.Module, input_shape: tuple[int, int, int], seed: int = 0, batch: int = EXAMPLE_BATCH) -> torch.export.ExportedProgram:
    """``torch.export`` the module on a random example, as a one-line CaptureError on failure."""
    example = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(seed))
    try:
        with torch.no_grad():
            return torch.export.export(module, (example,), strict=False)
    except Exception as error:  # torch.export raises many unrelated types
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise CaptureError(f"torch.export could not trace the model on input {(batch, *input_shape)}: {type(error).__name__}: {first[:300]}") from None


def graph_from_export(exported: torch.export.ExportedProgram, batch: int = EXAMPLE_BATCH) -> Graph:
    """Walk an exported program and build the graph, failing on the first unsupported op."""
    ctx = _Context(exported, batch)
    signature = exported.graph_signature
    sources: dict[str, Any] = {}
    for spec in signature.input_specs:
        kind = spec.kind.name
        if kind == "USER_INPUT":
            continue
        if kind in ("PARAMETER", "BUFFER"):
            sources[spec.arg.name] = exported.state_dict[spec.target] if spec.target in exported.state_dict else exported.constants[spec.target]
        elif kind in ("CONSTANT_TENSOR", "CUSTOM_OBJ"):
            sources[spec.arg.name] = exported.constants[spec.target]
    user_inputs = [s.arg.name for s in signature.input_specs if s.kind.name == "USER_INPUT"]
    if len(user_inputs) != 1:
        raise CaptureError(f"the model takes {len(user_inputs)} inputs; only single-image-tensor classifiers are supported")
    output_name: str | None = None
    for fx_node in exported.graph.nodes:
        if fx_node.op == "placeholder":
            if fx_node.name == user_inputs[0]:
                ctx.nodes.append(Node("input", "input", (), {}, {}, ctx.shape(fx_node), ""))
                ctx.used_names.add("input")
                ctx.values[fx_node.name] = "input"
            else:
                ctx.values[fx_node.name] = sources[fx_node.name]
        elif fx_node.op == "call_function":
            ctx.values[fx_node.name] = _translate(ctx, fx_node)
        elif fx_node.op == "output":
            outputs = fx_node.args[0]
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            if len(outputs) != 1:
                raise CaptureError(f"the model returns {len(outputs)} values; only a single logits tensor is supported")
            result = ctx.value(outputs[0])
            if not isinstance(result, str):
                raise CaptureError("the model's output does not depend on its input")
            output_name = result
        else:
            raise CaptureError(f"node {fx_node.name!r}: unsupported graph node kind {fx_node.op!r}")
    assert output_name is not None  # an exported program always has an output node
    return _prune(Graph(ctx.nodes, output_name))


def _translate(ctx: _Context, fx_node: torch.fx.Node) -> Any:
    translator = CAPTURE_TABLE.get(fx_node.target)
    depends_on_input = any(isinstance(ctx.values.get(a.name), (str, tuple)) for a in fx_node.all_input_nodes)
    if not depends_on_input and fx_node.target is not operator.getitem:
        # Parameter-only arithmetic (t(W), W.view(...)): fold into a constant.
        args = ctx.value(tuple(fx_node.args))
        kwargs = {k: ctx.value(v) for k, v in fx_node.kwargs.items()}
        try:
            with torch.no_grad():
                return fx_node.target(*args, **kwargs)
        except Exception as error:
            raise ctx.error(fx_node, f"could not fold a parameter-only computation ({error})") from None
    if translator is None:
        raise ctx.error(fx_node, "op is not supported by edgesnn; supported: " + ", ".join(supported_ops()))
    result = translator(ctx, fx_node)
    if isinstance(result, _Alias):
        return result.name
    return result


def _prune(graph: Graph) -> Graph:
    """Drop nodes the output does not depend on."""
    needed = {graph.output}
    for node in reversed(graph.nodes):
        if node.name in needed:
            needed.update(node.inputs)
    return Graph([n for n in graph.nodes if n.name in needed or n.op == "input"], graph.output)


def check_equivalence(module: nn.Module, graph: Graph, input_shape: tuple[int, int, int], config: CaptureConfig, batch: int = CHECK_BATCH) -> float:
    """Max |graph − model| on random inputs, scaled by 1 + max |model output|; error above tolerance."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    x = torch.randn(batch, *input_shape, generator=generator)
    with torch.no_grad():
        try:
            expected = module(x)
        except Exception as error:
            raise CaptureError(f"the model fails on a batch of {batch} inputs of shape {input_shape}: {type(error).__name__}: {str(error).splitlines()[0][:200]}") from None
        found = GraphNetwork(graph).eval()(x)
    if not isinstance(expected, torch.Tensor) or expected.shape != found.shape:
        raise CaptureError(f"the captured graph gives output shape {tuple(found.shape)} but the model gives {getattr(expected, 'shape', type(expected).__name__)}")
    difference = float((expected - found).abs().max() / (1 + expected.abs().max()))
    if not difference <= config.tolerance:
        raise CaptureError(
            f"the captured graph disagrees with the model (relative difference {difference:.2e} > {config.tolerance:.0e}); "
            "the forward pass may depend on Python control flow or on the batch size"
        )
    return difference


def _eval_mode(module: nn.Module) -> nn.Module:
    try:
        return module.eval()
    except NotImplementedError:  # ExportedProgram.module() is already in inference form
        return module


def capture(loaded: LoadedModel, config: CaptureConfig = CaptureConfig()) -> Teacher:
    """Trace ``loaded.module`` into a checked ``Graph`` and wrap it as the Teacher."""
    if loaded.input_shape is None:
        raise CaptureError(f"{loaded.source}: the input shape could not be inferred; pass --input-shape C,H,W")
    module = _eval_mode(loaded.module)
    fixed = static_batch(module)
    exported = export_model(module, loaded.input_shape, config.seed, fixed or EXAMPLE_BATCH)
    graph = graph_from_export(exported, fixed or EXAMPLE_BATCH)
    if not graph.neurons():
        raise CaptureError(f"{loaded.source}: the model has no ReLU, so there is nothing to turn into spiking neurons")
    # A different batch size than the trace catches sizes baked into views; an
    # exported program accepts only its own batch size, so it is checked at that.
    check_equivalence(module, graph, loaded.input_shape, config, fixed or CHECK_BATCH)
    output_shape = graph[graph.output].shape
    if len(output_shape) != 1:
        raise CaptureError(f"{loaded.source}: the model's output has shape {output_shape} per sample; expected a vector of class logits")
    num_classes = output_shape[0]
    if loaded.num_classes is not None and loaded.num_classes != num_classes:
        raise CaptureError(f"{loaded.source}: the checkpoint says {loaded.num_classes} classes but the model outputs {num_classes} logits")
    return Teacher(graph, tuple(loaded.input_shape), num_classes, loaded.normalize, loaded.source)
