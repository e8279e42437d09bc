"""Exporters of spiking models to deployment formats, and the runtimes that check them.

``EXPORTERS`` maps a target name to a function ``(model, context) -> {file
name: bytes}``: exporters return bytes and never write, so the pipeline can
write a bundle atomically and record each file's sha256. A target's runner
(``RUNNERS``) takes the bundle folder and uint8 pixels and returns the
artifact's predictions, so ``edgesnn eval`` can run every artifact on real
images.

Targets:

- ``onnx``: ``model.onnx``, float arithmetic on the deployed (int8/binary) weights, one
  timestep (or a step function for T > 1);
- ``c``: ``c/``: the C99 runtime, the generated model and a host harness, with
  golden images and logits from the synthetic set (``make -C c check``);
- ``tflite``: ``model.tflite``, 16x8-quantized integer TFLite (int16 activations,
  int8 weights; binary layers as ±1 int8), run in LiteRT's interpreter;
- ``nir``: ``model.nir``, the NIR graph (HDF5) for neuromorphic toolchains, with
  weight formats and thresholds in node metadata, run by edgesnn's NIR interpreter;

Adding a target is one function in its module and one entry in each map.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgesnn.artifacts import SpikingModel
from edgesnn.errors import ExportError

from .program import Program, check_finite, deployment_model, images_from_pixels, lower, pixels_from_images, run_reference

ONNX_FILE = "model.onnx"
TFLITE_FILE = "model.tflite"
NIR_FILE = "model.nir"
C_FOLDER = "c"
GOLDEN_IMAGES = "golden_images.bin"
GOLDEN_LOGITS = "golden_logits.txt"


@dataclass
class ExportContext:
    """What every exporter may need besides the model."""

    model: SpikingModel
    stamp: str  # "edgesnn 0.x, manifest <sha256>": the first line of generated sources
    golden_pixels: torch.Tensor | None = None  # uint8 N×C×H×W images for golden outputs (synthetic: the build reads no data)
    notes: dict = field(default_factory=dict)  # per target: figures for the manifest (bytes, arena, ...)

    @cached_property
    def program(self) -> Program:
        return lower(self.model)


def _export_onnx(context: ExportContext) -> dict[str, bytes]:
    from .to_onnx import onnx_bytes

    # A one-timestep model is exported as deployed (int8/binary weights), so ONNX computes what the C firmware computes.
    data = onnx_bytes(deployment_model(context.model) if context.model.timesteps == 1 else context.model)
    context.notes["onnx"] = {"bytes": len(data), "timesteps": context.model.timesteps}
    return {ONNX_FILE: data}


def _export_c(context: ExportContext) -> dict[str, bytes]:
    from .to_c import arena_bytes, c_sources, weight_bytes

    program = context.program
    files = {f"{C_FOLDER}/{name}": data for name, data in c_sources(program, context.stamp).items()}
    if context.golden_pixels is not None and len(context.golden_pixels):
        logits = run_reference(program, context.golden_pixels)
        files[f"{C_FOLDER}/{GOLDEN_IMAGES}"] = context.golden_pixels.numpy().astype(np.uint8).tobytes()
        files[f"{C_FOLDER}/{GOLDEN_LOGITS}"] = "".join(" ".join(str(int(v)) for v in row) + "\n" for row in logits.tolist()).encode()
    context.notes["c"] = {"arena_bytes": arena_bytes(program), "constant_bytes": weight_bytes(program), "ops": len(program.ops)}
    return files


def _export_tflite(context: ExportContext) -> dict[str, bytes]:
    from .to_tflite import tflite_bytes

    data = tflite_bytes(context.program, context.stamp)
    context.notes["tflite"] = {"bytes": len(data)}
    return {TFLITE_FILE: data}


def _export_nir(context: ExportContext) -> dict[str, bytes]:
    from .to_nir import nir_bytes

    data = nir_bytes(context.model, context.stamp)
    context.notes["nir"] = {"bytes": len(data), "metadata": "node metadata: edgesnn_weight_format, edgesnn_weight_bits, edgesnn_weight_scale; IF: edgesnn_threshold, edgesnn_fires_at"}
    return {NIR_FILE: data}


EXPORTERS: dict[str, Callable[[ExportContext], dict[str, bytes]]] = {
    "onnx": _export_onnx,
    "c": _export_c,
    "tflite": _export_tflite,
    "nir": _export_nir,
}

ONE_STEP_ONLY = {"c", "tflite", "nir"}  # targets that need a one-timestep model


def refusal(target: str, model: SpikingModel) -> str | None:
    """Why ``target`` cannot express this model's ops at all, or None ("all" leaves such targets out)."""
    if target == "nir":
        from .to_nir import nir_refusal

        return nir_refusal(model)
    return None


def parse_targets(text: str | None, model: SpikingModel) -> list[str]:
    """``onnx,c`` -> ["onnx", "c"]; "all" or None: every target the model allows."""
    if text is None or text.strip() == "all":
        return [name for name in EXPORTERS if (model.timesteps == 1 or name not in ONE_STEP_ONLY) and refusal(name, model) is None]
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ExportError("--targets is empty; valid: " + ", ".join(EXPORTERS) + ", all")
    for name in names:
        if name not in EXPORTERS:
            raise ExportError(f"unknown target {name!r}; valid: {', '.join(EXPORTERS)}, all")
        if name in ONE_STEP_ONLY and model.timesteps != 1:
            raise ExportError(f"target {name!r} needs a one-timestep model; this one runs T={model.timesteps} (build with --private)")
    return list(dict.fromkeys(names))


def export_files(context: ExportContext, targets: list[str]) -> dict[str, bytes]:
    """Every file of the chosen targets, by path relative to the bundle."""
    check_finite(context.model)
    files: dict[str, bytes] = {}
    for name in targets:
        files.update(EXPORTERS[name](context))
    return files


# ---------------------------------------------------------------------------
# Runners: predictions of a bundle's artifacts on real images


def run_onnx_artifact(folder: Path, model: SpikingModel, pixels: torch.Tensor) -> np.ndarray:
    """Logits of ``model.onnx`` on the images (normalised as the model expects)."""
    from .to_onnx import run_onnx

    images = images_from_pixels(pixels, model.normalize).numpy()
    return run_onnx((folder / ONNX_FILE).read_bytes(), images)


def compile_c(folder: Path, build_dir: Path) -> Path:
    """Build the C harness of ``folder/c`` in ``build_dir``; returns the executable."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    make = shutil.which("make")
    if compiler is None or make is None:
        raise ExportError("running the C firmware needs a C compiler and make on PATH")
    shutil.copytree(folder / C_FOLDER, build_dir, dirs_exist_ok=True)
    result = subprocess.run([make, "-s", "-C", str(build_dir), f"CC={compiler}", "harness"], capture_output=True, text=True)
    if result.returncode != 0:
        raise ExportError(f"export c: the firmware did not compile: {(result.stderr or result.stdout).strip().splitlines()[-1] if (result.stderr or result.stdout).strip() else 'no output'}")
    return build_dir / "harness"


def run_c_harness(executable: Path, pixels: torch.Tensor) -> np.ndarray:
    """int64 logits printed by the compiled harness for each image."""
    data = pixels.numpy().astype(np.uint8).tobytes()
    result = subprocess.run([str(executable)], input=data, capture_output=True)
    if result.returncode != 0:
        raise ExportError(f"export c: the harness failed: {result.stderr.decode(errors='replace').strip()}")
    rows = [[int(v) for v in line.split()] for line in result.stdout.decode().splitlines() if line.strip()]
    return np.asarray(rows, dtype=np.int64).reshape(len(pixels), -1)


def run_c_artifact(folder: Path, model: SpikingModel, pixels: torch.Tensor) -> np.ndarray:
    with tempfile.TemporaryDirectory(prefix="edgesnn-c-") as build_dir:
        return run_c_harness(compile_c(folder, Path(build_dir)), pixels)


def run_tflite_artifact(folder: Path, model: SpikingModel, pixels: torch.Tensor) -> np.ndarray:
    """Logits of ``model.tflite`` in the LiteRT interpreter."""
    from .to_tflite import run_tflite

    return run_tflite((folder / TFLITE_FILE).read_bytes(), images_from_pixels(pixels, model.normalize).numpy(), batch=64)


def run_nir_artifact(folder: Path, model: SpikingModel, pixels: torch.Tensor) -> np.ndarray:
    """Logits of ``model.nir`` run for one timestep by edgesnn's NIR interpreter."""
    from .to_nir import run_nir

    return run_nir((folder / NIR_FILE).read_bytes(), images_from_pixels(pixels, model.normalize).numpy())


RUNNERS: dict[str, Callable[[Path, SpikingModel, torch.Tensor], np.ndarray]] = {
    "onnx": run_onnx_artifact,
    "c": run_c_artifact,
    "tflite": run_tflite_artifact,
    "nir": run_nir_artifact,
}

ARTIFACTS = {"onnx": ONNX_FILE, "c": f"{C_FOLDER}/esnn_model.c", "tflite": TFLITE_FILE, "nir": NIR_FILE}  # the file whose presence says a target was exported


__all__ = [
    "ARTIFACTS",
    "EXPORTERS",
    "ExportContext",
    "RUNNERS",
    "compile_c",
    "deployment_model",
    "export_files",
    "images_from_pixels",
    "lower",
    "parse_targets",
    "pixels_from_images",
    "run_c_harness",
    "run_reference",
]
