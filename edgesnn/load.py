"""The load stage: a user's classifier, from a zoo name, checkpoint or archive.

    =========================  ==============================  ===============  =============
    what ``spec`` is           how it is read                  needs            ``format``
    =========================  ==============================  ===============  =============
    a zoo name                 factory + state_dict            -                "zoo"
    state_dict (.pt/.pth/...)  torch.load(weights_only=True)   ``arch``         "state_dict"
    Lightning checkpoint       torch.load(weights_only=True)   ``arch``         "lightning"
    torch.export archive .pt2  torch.export.load               -                "export"
    TorchScript archive        torch.jit.load                  -                "torchscript"
    pickled whole nn.Module    torch.load(weights_only=False)  ``trust_pickle`` "pickle"
    =========================  ==============================  ===============  =============

A state_dict is found as the checkpoint itself or under one of the usual
wrapper keys (``state_dict``, ``model_state_dict``, ``model``, ``net``,
``network``, ``module``); ``module.`` / ``model.`` prefixes (DataParallel,
Lightning) are stripped when that makes the keys fit the architecture, and the
weights are then loaded strictly. ``arch`` is a zoo name or
``path/to/model.py:factory``, where ``factory`` is a callable (a function or a
class) that builds the untrained ``nn.Module`` without arguments.

Nothing is unpickled with code execution unless ``trust_pickle`` is set: a file
that needs it raises ``UnsafePickleError`` before anything in it runs. That
covers .pt2 archives too, whose pickled payloads torch.export.load would
otherwise unpickle in full; they are checked with weights-only loading first.
TorchScript archives hold TorchScript code, which runs in TorchScript's own
interpreter and cannot import Python modules, so they load without the flag.

The input shape C,H,W and the class count are taken from the zoo entry, the
Lightning hyper-parameters or the export metadata, else inferred: C from the
first Conv2d, H = W from the first square size in ``CANDIDATE_SIZES`` on which
a forward pass runs (28 for one channel, 32 otherwise when the network does not
depend on the size), and the class count from the logits of that forward pass.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import pickle
import pickletools
import re
import sys
import warnings
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .artifacts import LoadedModel, Normalize
from .archives import check_zip
from .errors import LoadError, UnsafePickleError
from .zoo import ZOO

CANDIDATE_SIZES = (28, 32, 64, 96, 128, 224)  # square H = W tried, in order, to infer the input size
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")  # where checkpoints keep the weights
STRIPPABLE_PREFIXES = ("module", "model")  # DataParallel / Lightning wrappers around the real module
LIGHTNING_MARKERS = ("pytorch-lightning_version", "lightning_version")
HPARAM_INPUT_SHAPE = ("input_shape", "in_shape", "image_shape")
HPARAM_NUM_CLASSES = ("num_classes", "n_classes")
LISTED_NAMES = 8  # key lists in messages are cut to this many names

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([\w.]+)")
_SCAN_BYTES = 16 * 2**20  # a pickle is scanned for globals only up to this size
_EXPORT_PICKLE_DIRS = ("data/weights/", "data/constants/", "data/sample_inputs/")  # .pt2 folders torch.export.load unpickles
_TORCH_NOISE = ("Weights only load failed", "Check the documentation", "In PyTorch 2.6", "(1)", "(2)", "Please file an issue")


@dataclass(frozen=True)
class LoadConfig:
    """How to load a checkpoint; every field maps to one CLI option."""

    arch: str | None = None  # --arch: zoo name or "path/to/model.py:factory", needed for a bare state_dict
    input_shape: tuple[int, int, int] | None = None  # --input-shape C,H,W: overrides anything inferred
    trust_pickle: bool = False  # --trust-pickle: allow unpickling whole objects (runs code from the file)


@dataclass(frozen=True)
class _Read:
    """What a reader found, before the common checks and inference."""

    module: nn.Module
    format: str
    source: str
    input_shape: tuple[int, int, int] | None = None
    num_classes: int | None = None
    normalize: Normalize | None = None


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """Parse ``C,H,W`` (``CxHxW`` also accepted) into three positive integers."""
    parts = [part.strip() for part in re.split(r"[,x×]", text.strip())]
    expected = "expected C,H,W as three positive integers, e.g. 1,28,28 or 3,32,32"
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        raise LoadError(f"--input-shape {text!r}: {expected}")
    shape = tuple(int(part) for part in parts)
    _check_input_shape(shape, f"--input-shape {text!r}")
    return shape  # type: ignore[return-value]


def load_model(spec: str | os.PathLike, config: LoadConfig = LoadConfig()) -> LoadedModel:
    """Load a classifier named by ``spec`` (a zoo name or a file) as an eval-mode float32 module."""
    spec = os.fspath(spec)
    if config.input_shape is not None:
        _check_input_shape(config.input_shape, f"input_shape {config.input_shape!r}")
    zoo_name = spec[4:] if spec.startswith("zoo:") else spec
    if zoo_name in ZOO:
        read = _read_zoo(zoo_name)
    else:
        path = Path(spec)
        _check_file(path, spec)
        read = _read_file(path, config)
    return _finish(read, config, spec)


# ---------------------------------------------------------------- readers


def _read_zoo(name: str) -> _Read:
    entry = ZOO[name]
    path = entry.weights_path
    if not path.is_file():
        raise LoadError(
            f"zoo model {name!r}: weights file {path} is missing; train it with `python scripts/train_zoo.py --models {name}`"
        )
    state = _find_state_dict(_torch_load(path, trust_pickle=False)[0])
    if not isinstance(state, Mapping):
        raise LoadError(f"zoo model {name!r}: {path} holds no state_dict")
    module = entry.factory()
    _load_state(module, state, path, f"zoo model {name}")
    return _Read(module, "zoo", f"zoo:{name}", entry.input_shape, entry.num_classes, entry.normalize)


def _read_file(path: Path, config: LoadConfig) -> _Read:
    check_zip(path, LoadError, "checkpoint or archive")  # zip bombs and lying sizes are refused before any reader allocates
    names = _zip_names(path)
    if path.suffix == ".pt2" or any(name.endswith("/archive_format") for name in names):
        return _read_export(path, config.trust_pickle)
    if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
        return _read_torchscript(path)
    return _read_checkpoint(path, config, names)


def _read_export(path: Path, trust_pickle: bool) -> _Read:
    unsafe = None if trust_pickle else _export_needs_pickle(path)
    if unsafe is not None:
        raise UnsafePickleError(
            f"{path}: torch.export archive holds pickled Python code/objects ({unsafe}) that loading would execute; "
            "it was NOT executed. If you trust this file, pass --trust-pickle to load it"
        )
    try:
        program = torch.export.load(str(path))
        module = program.module()
    except Exception as error:  # any failure to read a user's file is the file's fault
        raise LoadError(f"{path}: not a readable torch.export archive ({type(error).__name__}: {_reason(error)})") from None
    _exported_to_eval(module)
    input_shape, num_classes = _export_shapes(program)
    return _Read(module, "export", f"{path.name} (torch.export)", input_shape, num_classes)


def _read_torchscript(path: Path) -> _Read:
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # any failure to read a user's file is the file's fault
        raise LoadError(f"{path}: not a readable TorchScript archive ({type(error).__name__}: {_reason(error)})") from None
    return _Read(module, "torchscript", f"{path.name} (TorchScript)")


def _read_checkpoint(path: Path, config: LoadConfig, zip_names: list[str]) -> _Read:
    with path.open("rb") as handle:
        magic = handle.read(4)
    if not zip_names and magic == b"PK\x03\x04":
        raise LoadError(f"{path}: truncated or damaged zip archive (no central directory); expected a complete torch.save file")
    checkpoint, unpickled = _torch_load(path, config.trust_pickle)
    pickled = " (trusted pickle)" if unpickled else ""
    found = _find_state_dict(checkpoint)
    if isinstance(found, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        found = found.module
    if isinstance(found, nn.Module):
        return _Read(found, "pickle", f"{path.name} (pickled nn.Module, trusted)")
    if found is None:
        raise LoadError(f"{path}: {_describe(checkpoint)}; expected a state_dict (names to tensors), possibly under one of the keys {', '.join(WRAPPER_KEYS)}")
    lightning = isinstance(checkpoint, Mapping) and (
        any(marker in checkpoint for marker in LIGHTNING_MARKERS) or ("state_dict" in checkpoint and "hyper_parameters" in checkpoint)
    )
    kind = "lightning" if lightning else "state_dict"
    if config.arch is None:
        raise LoadError(
            f"{path}: holds only weights ({kind}); name the architecture with --arch ZOO_NAME or --arch path/to/model.py:factory "
            f"(zoo: {', '.join(ZOO)})"
        )
    module = _build_architecture(config.arch)
    _load_state(module, found, path, f"--arch {config.arch}")
    input_shape, num_classes = _hyper_parameters(checkpoint) if lightning else (None, None)
    return _Read(module, kind, f"{path.name} ({kind}, arch={config.arch}){pickled}", input_shape, num_classes)


# ---------------------------------------------------------------- reading pickles safely


def _torch_load(path: Path, trust_pickle: bool) -> tuple[Any, bool]:
    """torch.load without code execution; with it only when trusted and needed.

    Returns the checkpoint and whether full unpickling (code execution) was used.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(path, map_location="cpu", weights_only=True), False
    except pickle.UnpicklingError as error:
        unsafe = _unsafe_global(error, path)
        if unsafe is None:
            raise LoadError(f"{path}: not a PyTorch checkpoint, or corrupt ({_reason(error)}); expected a file written by torch.save") from None
        if not trust_pickle:
            raise UnsafePickleError(
                f"{path}: contains pickled Python code/objects (global {unsafe}) that loading would execute; it was NOT executed. "
                "If you trust this file, pass --trust-pickle to load it (or re-save model.state_dict() and use --arch)"
            ) from None
    except Exception as error:  # weights-only loading runs no code: any failure is the file's fault
        raise LoadError(
            f"{path}: not a PyTorch checkpoint, or corrupt ({type(error).__name__}: {_reason(error)}); expected a file written by torch.save"
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False), True
    except Exception as error:  # the user's pickle ran its own code; report whatever it raised
        raise LoadError(f"{path}: unpickling with --trust-pickle failed ({type(error).__name__}: {_reason(error)})") from None


def _unsafe_global(error: Exception, path: Path) -> str | None:
    """The global a refused pickle needs, or None when the file is simply not a pickle."""
    match = _GLOBAL_IN_MESSAGE.search(str(error))
    if match:
        return match.group(1)
    try:
        with path.open("rb") as handle:
            data = handle.read(_SCAN_BYTES)
    except OSError:
        return None
    return _first_unsafe_global(data)


def _first_unsafe_global(data: bytes) -> str | None:
    """The first global outside torch's weights-only allowlist in pickled bytes (a torch.save zip or raw pickles)."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except ImportError:  # private helper moved: fall back to what a plain state_dict needs
        allowed = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter"}
    unsafe = [name for name in _pickled_globals(data) if name not in allowed]
    return unsafe[0] if unsafe else None


def _pickled_globals(data: bytes) -> list[str]:
    """Globals referenced by pickled bytes, read with pickletools (nothing is executed)."""
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
                data = archive.read(pickles[0]) if pickles else b""
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError, zlib.error):
            return []  # a damaged archive (bad names, encryption, unknown compression): no globals to name
    found: list[str] = []
    position = 0
    while position < len(data) and len(found) < 100:
        strings: list[str] = []
        globals_here: list[str] = []
        try:
            for opcode, argument, offset in pickletools.genops(data[position:]):
                if opcode.name in ("GLOBAL", "INST"):
                    globals_here.append(str(argument).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL":
                    globals_here.append(".".join(strings[-2:]) if len(strings) >= 2 else "<unknown>")
                elif isinstance(argument, str):
                    strings.append(argument)
                if opcode.name == "STOP":
                    position += offset + 1
                    break
            else:
                break
        except (ValueError, EOFError, pickle.UnpicklingError, UnicodeDecodeError):
            break  # not (or no longer) a pickle: only completed pickles count
        found += globals_here
    return found


def _export_needs_pickle(path: Path) -> str | None:
    """What in a .pt2 archive torch.export.load would unpickle with code execution, or None.

    torch.export.load unpickles pickled weights and constants with
    ``weights_only=False``, opaque constants with ``pickle.loads`` and falls back
    to full unpickling for sample inputs; only tensor payloads are plain bytes.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = {name.split("/", 1)[-1]: name for name in archive.namelist()}
            raw: set[str] = set()
            for relative, name in members.items():
                folder = relative.rpartition("/")[0] + "/"
                if folder not in _EXPORT_PICKLE_DIRS or not relative.endswith("_config.json"):
                    continue
                try:
                    entries = dict(json.loads(archive.read(name))["config"])
                    for fqn, entry in entries.items():
                        path_name = str(entry.get("path_name", ""))
                        if path_name.startswith(("custom_obj_", "opaque_obj_")):
                            return f"pickled object constant {fqn!r}"
                        if entry.get("use_pickle") is False:
                            raw.add(folder + path_name)
                except (ValueError, KeyError, TypeError, AttributeError):
                    return f"{relative}: unreadable payload config"
            for relative, name in members.items():
                folder = relative.rpartition("/")[0] + "/"
                if folder not in _EXPORT_PICKLE_DIRS or relative in raw or relative.endswith("_config.json"):
                    continue
                data = archive.read(name)
                try:
                    torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
                except Exception as error:  # anything weights-only loading refuses would be fully unpickled
                    match = _GLOBAL_IN_MESSAGE.search(str(error))
                    unsafe = match.group(1) if match else _first_unsafe_global(data)
                    return f"{relative}: global {unsafe}" if unsafe else f"{relative}: not loadable without full unpickling"
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError, zlib.error) as error:
        raise LoadError(f"{path}: not a readable torch.export archive ({type(error).__name__}: {_reason(error)})") from None
    return None


# ---------------------------------------------------------------- state_dicts


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(key, str) and isinstance(tensor, torch.Tensor) for key, tensor in value.items())
    )


def _find_state_dict(checkpoint: Any, depth: int = 0) -> Mapping | nn.Module | None:
    """The weights in a checkpoint: the object itself or under the usual wrapper keys."""
    if isinstance(checkpoint, nn.Module) or _is_state_dict(checkpoint):
        return checkpoint
    if isinstance(checkpoint, Mapping) and depth < 2:
        for key in WRAPPER_KEYS:
            if key in checkpoint:
                found = _find_state_dict(checkpoint[key], depth + 1)
                if found is not None:
                    return found
    return None


def _load_state(module: nn.Module, state: Mapping, path: Path, arch: str) -> None:
    """Load ``state`` into ``module`` strictly, after stripping wrapper prefixes that do not fit."""
    expected = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}
    renamed, prefix = _strip_prefixes(state, expected)
    missing = [name for name in expected if name not in renamed and not name.endswith("num_batches_tracked")]
    unexpected = [name for name in renamed if name not in expected]
    mismatched = [
        f"{name} expected {_shape(expected[name])} found {_shape(tuple(renamed[name].shape))}"
        for name in expected
        if name in renamed and tuple(renamed[name].shape) != expected[name]
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys ({_names(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({_names(unexpected)})")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches ({_names(mismatched)})")
        stripped = f" after stripping prefix {prefix!r}" if prefix else ""
        raise LoadError(f"{path}: weights do not fit {arch}{stripped}: {'; '.join(problems)}")
    try:
        module.load_state_dict(renamed, strict=True)
    except RuntimeError as error:  # a module's own loading rule refused a value we could not foresee
        raise LoadError(f"{path}: weights do not fit {arch}: {_reason(error)}") from None


def _strip_prefixes(state: Mapping, expected: Mapping[str, tuple]) -> tuple[OrderedDict, str]:
    """Rename keys by dropping a leading run of ``module.``/``model.``, choosing what matches best."""
    prefixes = {""}
    for key in state:
        prefix = ""
        for part in key.split(".")[:-1]:
            if part not in STRIPPABLE_PREFIXES:
                break
            prefix += part + "."
            prefixes.add(prefix)
    best, best_prefix, best_score = None, "", -1
    for prefix in sorted(prefixes, key=len):
        renamed = OrderedDict((key[len(prefix) :] if key.startswith(prefix) else key, value) for key, value in state.items())
        if len(renamed) != len(state):
            continue  # stripping would merge two keys into one
        score = len(renamed.keys() & expected.keys())
        if score > best_score:
            best, best_prefix, best_score = renamed, prefix, score
    metadata = getattr(state, "_metadata", None)
    if metadata is not None and best is not None:
        strip = best_prefix[:-1]
        best._metadata = OrderedDict(  # type: ignore[attr-defined]
            (key[len(best_prefix) :] if key.startswith(best_prefix) else ("" if key == strip and strip else key), value)
            for key, value in metadata.items()
        )
    return best if best is not None else OrderedDict(state), best_prefix


def _hyper_parameters(checkpoint: Mapping) -> tuple[tuple[int, int, int] | None, int | None]:
    """Input shape and class count recorded in a Lightning checkpoint's hyper-parameters, if any."""
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, Mapping):
        return None, None
    input_shape = None
    for key in HPARAM_INPUT_SHAPE:
        value = hparams.get(key)
        if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, int) and v > 0 for v in value):
            input_shape = tuple(value)
            break
    num_classes = next(
        (hparams[key] for key in HPARAM_NUM_CLASSES if isinstance(hparams.get(key), int) and hparams[key] > 0), None
    )
    return input_shape, num_classes  # type: ignore[return-value]


# ---------------------------------------------------------------- architectures


def _build_architecture(arch: str) -> nn.Module:
    """Build the untrained module named by ``--arch``: a zoo name or ``file.py:factory``."""
    if arch in ZOO:
        return ZOO[arch].factory()
    usage = f"expected a zoo name ({', '.join(ZOO)}) or path/to/model.py:factory"
    file_text, colon, factory_name = arch.rpartition(":")
    if not colon or not file_text.endswith(".py") or not factory_name:
        raise LoadError(f"--arch {arch!r}: {usage}")
    file = Path(file_text)
    if not file.is_file():
        raise LoadError(f"--arch {arch!r}: file {file} does not exist; {usage}")
    source = _import_file(file, arch)
    factory: Any = source
    for attribute in factory_name.split("."):
        if not hasattr(factory, attribute):
            available = sorted(name for name, value in vars(source).items() if callable(value) and not name.startswith("_"))
            raise LoadError(f"--arch {arch!r}: {file} has no {factory_name!r}; callables there: {', '.join(available) or 'none'}")
        factory = getattr(factory, attribute)
    if not callable(factory):
        raise LoadError(f"--arch {arch!r}: {factory_name} in {file} is a {type(factory).__name__}, expected a function or class returning an nn.Module")
    try:
        module = factory()
    except Exception as error:  # the user's factory: whatever it raises is a problem with their file
        raise LoadError(f"--arch {arch!r}: {factory_name}() raised {type(error).__name__}: {_reason(error)}") from None
    if not isinstance(module, nn.Module):
        raise LoadError(f"--arch {arch!r}: {factory_name}() returned a {type(module).__name__}, expected an nn.Module")
    return module


def _import_file(file: Path, arch: str) -> Any:
    """Import a Python file by path, with its folder importable for sibling modules."""
    resolved = file.resolve()
    stem = re.sub(r"\W", "_", resolved.stem)
    name = f"edgesnn_arch_{stem}_{abs(hash(str(resolved))):x}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise LoadError(f"--arch {arch!r}: cannot import {file} as a Python module")
    source = importlib.util.module_from_spec(spec)
    sys.modules[name] = source
    sys.path.insert(0, str(resolved.parent))
    try:
        spec.loader.exec_module(source)
    except Exception as error:  # the user's code: report what it raised, on one line
        del sys.modules[name]
        raise LoadError(f"--arch {arch!r}: importing {file} raised {type(error).__name__}: {_reason(error)}") from None
    finally:
        sys.path.remove(str(resolved.parent))
    return source


# ---------------------------------------------------------------- torch.export


def _exported_to_eval(module: torch.fx.GraphModule) -> None:
    """Rewrite a train-mode export to inference: BatchNorm on running stats, dropout as identity.

    An exported graph bakes in the mode it was captured in, and its ``eval()``
    is not supported, so the training flags of the ops are switched off here.
    """
    aten = torch.ops.aten
    dropouts = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default}
    for node in list(module.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.batch_norm.default and len(node.args) > 5 and node.args[5] is True:
            node.args = (*node.args[:5], False, *node.args[6:])
        elif node.target in dropouts and len(node.args) > 2 and node.args[2] is True:
            node.replace_all_uses_with(node.args[0])
            module.graph.erase_node(node)
        elif (
            node.target is aten.add_.Tensor
            and not node.users
            and getattr(node.args[0], "op", None) == "get_attr"
            and str(node.args[0].target).endswith("num_batches_tracked")
        ):
            module.graph.erase_node(node)  # the train-mode step counter of BatchNorm
    module.recompile()
    for submodule in module.modules():
        submodule.training = False  # GraphModule.eval() raises; the ops above are now in eval mode


def _export_shapes(program: Any) -> tuple[tuple[int, int, int] | None, int | None]:
    """C,H,W of the single image input and the logit count, from the program's shape metadata."""
    user_inputs = set(program.graph_signature.user_inputs)
    inputs = [node for node in program.graph.nodes if node.op == "placeholder" and node.name in user_inputs]
    input_shape = None
    if len(inputs) == 1 and hasattr(inputs[0].meta.get("val"), "shape"):
        shape = inputs[0].meta["val"].shape
        if len(shape) == 4 and all(isinstance(size, int) for size in shape[1:]):
            input_shape = tuple(int(size) for size in shape[1:])
    num_classes = None
    outputs = [node for node in program.graph.nodes if node.op == "output"]
    if outputs and outputs[0].args and len(outputs[0].args[0]) >= 1:
        value = getattr(outputs[0].args[0][0], "meta", {}).get("val")
        if hasattr(value, "shape") and len(value.shape) == 2 and isinstance(value.shape[-1], int):
            num_classes = int(value.shape[-1])
    return input_shape, num_classes  # type: ignore[return-value]


# ---------------------------------------------------------------- checks and inference


def _finish(read: _Read, config: LoadConfig, spec: str) -> LoadedModel:
    module = read.module.float()
    if read.format != "export":  # an exported graph was switched to eval by _exported_to_eval
        module.eval()
    _check_finite(module, spec)
    outputs: dict[tuple[int, ...], torch.Tensor | None] = {}

    def forward(shape: tuple[int, ...]) -> torch.Tensor | None:
        if shape not in outputs:
            outputs[shape] = _forward(module, shape)
        return outputs[shape]

    input_shape = config.input_shape or read.input_shape or _infer_input_shape(module, forward)
    num_classes = read.num_classes
    if num_classes is None:
        num_classes = _infer_num_classes(module, input_shape, forward)
    return LoadedModel(module, input_shape, num_classes, read.normalize, read.source, read.format)


def _check_finite(module: nn.Module, spec: str) -> None:
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            nan = int(torch.isnan(tensor).sum())
            inf = int(torch.isinf(tensor).sum())
            raise LoadError(
                f"{spec}: tensor {name!r} has {nan} NaN and {inf} Inf values out of {tensor.numel()}; expected finite weights"
            )


def _layers(module: nn.Module, kind: type[nn.Module]) -> list[nn.Module]:
    """Layers of a kind in registration order; also finds them inside TorchScript modules."""
    return [
        layer
        for layer in module.modules()
        if isinstance(layer, kind) or getattr(layer, "original_name", None) == kind.__name__
    ]


def _forward(module: nn.Module, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The output on zeros of ``1×shape``, or None when the network does not run on it."""
    try:
        with torch.no_grad():
            output = module(torch.zeros(1, *shape))
    except Exception:  # any failure means "not this shape"; the caller tries another
        return None
    return output if isinstance(output, torch.Tensor) else None


def _infer_input_shape(module: nn.Module, forward: Callable[[tuple[int, ...]], Any]) -> tuple[int, int, int] | None:
    convs = _layers(module, nn.Conv2d)
    if convs:
        weight = convs[0].weight
        channels = int(weight.shape[1]) * int(getattr(convs[0], "groups", 1))
        first = next((size for size in CANDIDATE_SIZES if forward((channels, size, size)) is not None), None)
        if first is None:
            return None
        preferred = 28 if channels == 1 else 32
        # A size-agnostic network (global pooling) runs on both; prefer the usual size.
        if first < preferred and forward((channels, preferred, preferred)) is not None:
            return channels, preferred, preferred
        return channels, first, first
    linears = _layers(module, nn.Linear)
    if linears:
        side = math.isqrt(int(linears[0].weight.shape[1]))
        if side * side == linears[0].weight.shape[1] and forward((1, side, side)) is not None:
            return 1, side, side
    return None


def _infer_num_classes(
    module: nn.Module, input_shape: tuple[int, int, int] | None, forward: Callable[[tuple[int, ...]], Any]
) -> int | None:
    if input_shape is not None:
        output = forward(tuple(input_shape))
        if output is not None and output.dim() == 2:
            return int(output.shape[-1])
    linears = _layers(module, nn.Linear)
    return int(linears[-1].weight.shape[0]) if linears else None


# ---------------------------------------------------------------- small helpers


def _check_file(path: Path, spec: str) -> None:
    if not path.exists():
        raise LoadError(f"{spec}: no such file, and not a zoo model (zoo: {', '.join(ZOO)})")
    if path.is_dir():
        raise LoadError(f"{spec}: is a directory; expected a checkpoint file (.pt/.pth/.ckpt), a .pt2 or a TorchScript archive")
    try:
        with path.open("rb") as handle:
            head = handle.read(1)
    except OSError as error:
        raise LoadError(f"{spec}: cannot read ({error.strerror})") from None
    if not head:
        raise LoadError(f"{spec}: empty file; expected a checkpoint")


def _check_input_shape(shape: tuple, where: str) -> None:
    if len(shape) != 3 or not all(isinstance(size, int) and 0 < size <= 65536 for size in shape):
        raise LoadError(f"{where}: expected C,H,W as three positive integers, e.g. 1,28,28 or 3,32,32")


def _zip_names(path: Path) -> list[str]:
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return archive.namelist()
    except (OSError, zipfile.BadZipFile):
        pass  # not a readable zip: torch.load reports it
    return []


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        keys = [str(key) for key in value]
        return f"holds a dict with keys ({_names(keys)}) but no tensors under them" if keys else "holds an empty dict"
    return f"holds a {type(value).__name__}"


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:LISTED_NAMES])
    return shown + (f", … +{len(names) - LISTED_NAMES} more" if len(names) > LISTED_NAMES else "")


def _shape(shape: tuple) -> str:
    return "(" + ", ".join(str(size) for size in shape) + ")"


def _reason(error: BaseException) -> str:
    """A one-line gist of a library's (often multi-line) error message."""
    lines = [_ANSI.sub("", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line and not line.startswith(_TORCH_NOISE)]
    text = lines[-1] if lines else type(error).__name__
    text = text.replace("WeightsUnpickler error: ", "")
    return text if len(text) <= 240 else text[:237] + "..."
