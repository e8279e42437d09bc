"""The build pipeline: runs the stages in order and is the only module that touches disk.

Output folder of ``edgesnn build``::

    teacher.pt       the captured ANN graph (plain tensors; weights_only-safe)
    synthetic.npz    synthetic images, labels, teacher logits
    synthetic.png    preview grid of the synthetic images
    snn.pt           the converted spiking model (plain tensors; weights_only-safe)
    private.pt       with --private: the SNN retrained through time and reduced to --timesteps
    binary.pt        with --binary: the same with layers binarized (the rest int8)
    model.onnx       the final model in ONNX (--targets onnx; default: every target)
    c/               C99 firmware: runtime, generated model, harness, golden outputs (--targets c)
    eval.json        accuracy on real data (when --eval-data is given)
    manifest.json    per stage: config, input and output sha256, seconds, peak RSS, metrics

Every file is written to a temporary name and renamed into place, and the
manifest is updated after each stage, so an interrupted build leaves only whole
files. A rerun with the same configuration resumes: a stage whose config and
inputs are unchanged and whose outputs are intact is loaded, not recomputed.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import io
import json
import resource
import shutil
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import __version__, bundle, distributed
from .artifacts import EvalReport, LoadedModel, Progress, SpikingModel, SyntheticSet, Teacher, no_progress
from .binarize import BinarizeConfig, binarize, model_bytes, teacher_bytes_fp32
from .capture import CaptureConfig, capture
from .convert import ConvertConfig, convert, spiking_from_state, spiking_state
from .archives import check_npz, check_zip
from .datasets import PACKAGED_SUBSET, LabelledImages, load_labelled_images
from .errors import ArtifactError, EdgeSNNError, PipelineError
from .evaluate import evaluate
from .graph import Graph
from .load import LoadConfig, load_model
from .privatize import PrivatizeConfig, RekeyConfig, TrainConfig, privatize, rekey_thresholds
from .zoo import DEFAULT_ZOO_MODEL, ZOO

MANIFEST = "manifest.json"
TEACHER_FILE = "teacher.pt"
SYNTHETIC_FILE = "synthetic.npz"
PREVIEW_FILE = "synthetic.png"
SNN_FILE = "snn.pt"
PRIVATE_FILE = "private.pt"
BINARY_FILE = "binary.pt"
EVAL_FILE = "eval.json"
PACKAGED_DATA = "packaged"  # --eval-data value for the real Fashion-MNIST subset shipped in the package

Log = Callable[[str], None]


def _synth():
    """``edgesnn.synth`` is imported lazily: only the pipeline and CLI depend on it."""
    from . import synth

    return synth


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation on real labelled images (never used by the build itself)."""

    data: str | None = None  # IDX folder, .npz, CIFAR-10 folder, or "packaged"; None: no evaluation
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # None: the teacher's own, if known
    limit: int | None = None  # evaluate on the first N images only
    split: str = "test"  # "test" or "train" split of an IDX/CIFAR folder
    timesteps: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # T values to report


BINARIZE_LR = 5e-4  # binarize fine-tunes a trained network: half the retraining learning rate


@dataclass(frozen=True)
class Budget:
    """Iteration counts of one ``--budget`` preset (each can still be set by its own option)."""

    synth_count: int  # synthetic images
    temporal_steps: int  # privatize: optimiser steps in each T > 1 phase
    final_steps: int  # privatize: optimiser steps at the final T
    binarize_step_steps: int  # binarize: fine-tuning steps after each binarized layer
    binarize_final_steps: int  # binarize: fine-tuning steps at the end
    size_ratio: float | None = None  # binarize: int8 back to the costliest binary channels within 1/size_ratio of the teacher's bytes

    def privatize_config(self, timesteps: int = 1, coding: str = "direct", device: str = "cpu", seed: int = 0, precision: str = "fp32") -> PrivatizeConfig:
        """What ``build --private --budget B`` retrains with (``--timesteps``, ``--coding``, ``--device``, ``--seed``, ``--precision`` resolved)."""
        train = dataclasses.replace(PrivatizeConfig.train, coding=coding, device=device, seed=seed, precision=precision)
        return PrivatizeConfig(timesteps=timesteps, temporal_steps=self.temporal_steps, final_steps=self.final_steps, train=train)

    def binarize_config(self, max_loss: float = BinarizeConfig.max_loss, binary_fraction: float | None = None, device: str = "cpu", seed: int = 0, precision: str = "fp32") -> BinarizeConfig:
        """What ``build --binary --budget B`` binarizes with (``--max-loss``, ``--binary-fraction``, ``--device``, ``--seed``, ``--precision`` resolved)."""
        train = TrainConfig(lr=BINARIZE_LR, device=device, seed=seed, precision=precision)
        return BinarizeConfig(max_loss=max_loss, binary_fraction=binary_fraction, step_steps=self.binarize_step_steps, final_steps=self.binarize_final_steps, size_ratio=self.size_ratio, train=train)


# Measured on 2 CPU cores (BENCHMARKS.md): fast ≈ 3 min, standard ≤ 10 min, thorough ≤ 60 min
# for the whole --private --binary build of a zoo model.
BUDGETS: dict[str, Budget] = {
    "fast": Budget(synth_count=1024, temporal_steps=20, final_steps=200, binarize_step_steps=30, binarize_final_steps=100),
    "standard": Budget(synth_count=2048, temporal_steps=20, final_steps=450, binarize_step_steps=50, binarize_final_steps=250),
    "thorough": Budget(synth_count=8192, temporal_steps=150, final_steps=4000, binarize_step_steps=300, binarize_final_steps=2000, size_ratio=15.0),
}


@dataclass(frozen=True)
class BuildConfig:
    """Everything ``edgesnn build`` does, one field per CLI option group."""

    model: str = DEFAULT_ZOO_MODEL  # zoo name or checkpoint path
    load: LoadConfig = field(default_factory=LoadConfig)
    synth: Any = None  # edgesnn.synth.SynthConfig; None: its defaults
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    privatize: PrivatizeConfig | None = None  # None: no retraining (the converted SNN is the result)
    binarize: BinarizeConfig | None = None  # None: no binarization; needs privatize
    rekey: RekeyConfig | None = field(default_factory=RekeyConfig)  # threshold re-keying of the final one-timestep private model; None: off
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    targets: str | None = "all"  # export targets, comma-separated, or "all" (those the final model allows); None: no export
    seed: int = 0  # seeds every stage
    device: str = "cpu"  # where synthesis runs (retraining: TrainConfig.device); under torchrun with cuda, this rank's GPU
    profile: bool = True  # write profile.json, report.md and crossbar plots (quick settings, synthetic images)
    audit: Any = None  # edgesnn.audit.AuditConfig: privacy audit of the final model (audit.json, audit.md, inverted-image grids); None: none
    seal: bundle.SealConfig = field(default_factory=bundle.SealConfig)  # signing and encryption of the finished bundle


@dataclass(frozen=True)
class BuildResult:
    """What a build produced, for the CLI's summary."""

    out: Path  # the output folder
    teacher: Teacher
    synthetic: SyntheticSet
    model: SpikingModel  # the final model: binary, else private, else converted
    report: EvalReport | None  # None without --eval-data
    converted: SpikingModel | None = None  # the converted SNN, when a later stage produced the final model
    private: SpikingModel | None = None  # the retrained model before binarization, when --binary produced the final one
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> {"seconds", "peak_rss_mb", "resumed", "metrics"}
    final_file: str = SNN_FILE  # file name of the final model in the output folder


# ---------------------------------------------------------------------------
# Files


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` through a temporary file and rename; returns its sha256."""
    bundle.write_atomic(path, data)
    return sha256_bytes(data)


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _torch_load(path: Path, what: str) -> Any:
    if Path(path).is_file():
        check_zip(Path(path), ArtifactError, what)  # declared sizes are allocated before they are read
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: {what} not found") from None
    except Exception as error:  # corrupt zip, pickle refused, ... (MemoryError included: a hostile size)
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise ArtifactError(f"{path}: not a readable {what} ({type(error).__name__}: {reason})") from None


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse rather than hand it back to the kernel.

    A training step allocates activations and gradients of tens of MiB each. Above malloc's mmap
    threshold (dynamic, at most 32 MiB) each such block is a fresh mapping, unmapped when freed, and
    its first touch costs one page fault per 4 KiB page, every step: a third of a binarize stage's
    CPU time went to the kernel. With both thresholds at 1 GiB the blocks come from the heap and are
    reused; 40 one-timestep training steps of the widest VGG take ~8% less time (BENCHMARKS.md,
    session 22). No result changes; the price is a higher peak RSS (the widest VGG's builds: 3.5 GiB
    against 2.8 standard, 4.3 against 2.8 thorough), since the heap keeps what it once held.
    Returns whether it applied (False off glibc, e.g. macOS or musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


# ---------------------------------------------------------------------------
# Artifacts <-> bytes


def teacher_bytes(teacher: Teacher) -> bytes:
    return _torch_bytes(
        {
            "format": "edgesnn-teacher",
            "graph": teacher.graph.to_dict(),
            "input_shape": list(teacher.input_shape),
            "num_classes": teacher.num_classes,
            "normalize": [list(teacher.normalize[0]), list(teacher.normalize[1])] if teacher.normalize else None,
            "source": teacher.source,
        }
    )


def read_teacher(path: Path) -> Teacher:
    state = _torch_load(path, "teacher")
    if not isinstance(state, dict) or state.get("format") != "edgesnn-teacher":
        raise ArtifactError(f"{path}: not an edgesnn teacher")
    normalize = state.get("normalize")
    try:
        return Teacher(
            Graph.from_dict(state["graph"], str(path)),
            tuple(int(v) for v in state["input_shape"]),
            int(state["num_classes"]),
            (tuple(normalize[0]), tuple(normalize[1])) if normalize else None,
            str(state["source"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ArtifactError(f"{path}: malformed teacher ({error})") from None


def synthetic_bytes(synthetic: SyntheticSet) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        images=synthetic.images.numpy(),
        labels=synthetic.labels.numpy(),
        teacher_logits=synthetic.teacher_logits.numpy(),
        method=np.array(synthetic.method),
        metrics=np.array(json.dumps(_jsonable(synthetic.metrics))),
        config=np.array(json.dumps(_jsonable(synthetic.config))),
    )
    return buffer.getvalue()


def read_synthetic(path: Path) -> SyntheticSet:
    try:
        check_npz(Path(path), ArtifactError, "synthetic set")  # array sizes are allocated before they are read
        with np.load(path, allow_pickle=False) as archive:
            images = torch.from_numpy(archive["images"].astype(np.float32))
            labels = torch.from_numpy(archive["labels"].astype(np.int64))
            logits = torch.from_numpy(archive["teacher_logits"].astype(np.float32))
            method = str(archive["method"]) if "method" in archive.files else "unknown"
            metrics = json.loads(str(archive["metrics"])) if "metrics" in archive.files else {}
            config = json.loads(str(archive["config"])) if "config" in archive.files else {}
    except FileNotFoundError:
        raise ArtifactError(f"{path}: synthetic set not found") from None
    except (KeyError, ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RecursionError, MemoryError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ArtifactError(f"{path}: not a readable synthetic set ({reason})") from None
    if images.dim() != 4 or labels.dim() != 1 or logits.dim() != 2 or len(images) != len(labels) or len(logits) != len(labels):
        raise ArtifactError(f"{path}: synthetic set arrays have inconsistent shapes")
    if not torch.isfinite(images).all() or not torch.isfinite(logits).all():
        raise ArtifactError(f"{path}: synthetic images or logits contain NaN or Inf")
    if not isinstance(metrics, dict) or not isinstance(config, dict):
        raise ArtifactError(f"{path}: synthetic set metrics/config are not JSON objects")
    return SyntheticSet(images, labels, logits, method, metrics, config)


def spiking_bytes(model: SpikingModel) -> bytes:
    return _torch_bytes(spiking_state(model))


def read_spiking(path: Path) -> SpikingModel:
    return spiking_from_state(_torch_load(path, "spiking model"), str(path))


def teacher_of(model: SpikingModel, source: str) -> Teacher:
    """The ANN equivalent of an SNN: its graph (BatchNorm folded) run with ReLUs."""
    return Teacher(model.graph, model.input_shape, model.num_classes, model.normalize, source)


# ---------------------------------------------------------------------------
# Running stages


class _Run:
    """One output folder: its manifest, and stages that are computed or resumed."""

    def __init__(self, out: Path, force: bool, log: Log):
        self.out = out
        self.log = log
        self.manifest_path = out / MANIFEST
        if out.exists() and not out.is_dir():
            raise PipelineError(f"--out {out}: exists and is not a folder")
        self.manifest = self._read_manifest() if not force else None
        if self.manifest is None:
            self.manifest = {"edgesnn": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stages": {}}
        self.manifest.update(
            {
                "edgesnn": __version__,
                "torch": torch.__version__,
                "numpy": np.__version__,
                "python": sys.version.split()[0],
                "datasets_read_by_build": [],
            }
        )
        self.stages: dict[str, dict[str, Any]] = {}

    def _read_manifest(self) -> dict | None:
        if not self.manifest_path.is_file():
            return None
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError, RecursionError):
            self.log(f"{self.manifest_path} is unreadable: starting the build over")
            return None
        return manifest if isinstance(manifest, dict) and isinstance(manifest.get("stages"), dict) else None

    def _intact(self, name: str, config: dict, inputs: dict[str, str]) -> bool:
        entry = self.manifest["stages"].get(name)
        if not entry or entry.get("config") != config or entry.get("inputs") != inputs:
            return False
        for filename, digest in entry.get("outputs", {}).items():
            path = self.out / filename
            if not path.is_file() or sha256_file(path) != digest:
                return False
        return True

    def stage(
        self,
        name: str,
        config: dict,
        inputs: dict[str, str],
        compute: Callable[[], tuple[Any, dict[str, bytes], dict]],
        restore: Callable[[], Any],
        followers: str | None = None,
    ) -> tuple[Any, dict[str, str]]:
        """Run or resume one stage; returns its artifact and its outputs' sha256 by file name.

        ``followers`` (torchrun builds): None, the other ranks skip this stage; "receive", they take
        its files from this rank; "compute", they also take part in computing it (collectives).
        """
        config = _jsonable(config)
        result = self._resume(name, config, inputs, restore)
        if followers is not None and distributed.active():
            distributed.broadcast_flag(result is None)  # whether the followers must compute with us
        if result is None:
            result = self._compute(name, config, inputs, compute)
        if followers is not None and distributed.active():
            artifact, outputs = result
            distributed.broadcast_bytes(json.dumps(outputs).encode())
            for filename in sorted(outputs):
                distributed.broadcast_bytes((self.out / filename).read_bytes())
        return result

    def _resume(self, name: str, config: dict, inputs: dict[str, str], restore: Callable[[], Any]) -> tuple[Any, dict[str, str]] | None:
        """The stage's artifact and outputs from a finished earlier run with the same config and inputs, or None."""
        if not self._intact(name, config, inputs):
            return None
        entry = self.manifest["stages"][name]
        try:
            artifact = restore()
        except EdgeSNNError as error:
            self.log(f"{name}: could not resume ({error}); recomputing")
            return None
        self.log(f"{name}: resumed from {', '.join(entry['outputs'])}")
        self.stages[name] = {"seconds": entry["seconds"], "peak_rss_mb": entry["peak_rss_mb"], "resumed": True, "metrics": entry.get("metrics", {})}
        return artifact, entry["outputs"]

    def _compute(self, name: str, config: dict, inputs: dict[str, str], compute: Callable[[], tuple[Any, dict[str, bytes], dict]]) -> tuple[Any, dict[str, str]]:
        started = time.perf_counter()
        artifact, files, metrics = compute()
        outputs = {filename: write_atomic(self.out / filename, data) for filename, data in files.items()}
        entry = {
            "config": config,
            "inputs": inputs,
            "outputs": outputs,
            "seconds": round(time.perf_counter() - started, 3),
            "peak_rss_mb": peak_rss_mb(),
            "metrics": _jsonable(metrics),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.manifest["stages"][name] = entry
        self.save_manifest()
        self.stages[name] = {"seconds": entry["seconds"], "peak_rss_mb": entry["peak_rss_mb"], "resumed": False, "metrics": entry["metrics"]}
        return artifact, outputs

    def save_manifest(self) -> None:
        write_atomic(self.manifest_path, (json.dumps(self.manifest, indent=2, sort_keys=True) + "\n").encode())


class _Follower:
    """A rank other than 0 of a torchrun build (``edgesnn.distributed``).

    It takes part in the stages rank 0 marks "compute" (synthesis and retraining run
    collectives), and takes every stage's files from rank 0 into a scratch folder, read
    back with the same readers as a resumed build. It writes no bundle.
    """

    def __init__(self, scratch: Path):
        self.out = scratch
        self.stages: dict[str, dict[str, Any]] = {}

    def stage(self, name: str, config: dict, inputs: dict[str, str], compute: Callable[[], Any], restore: Callable[[], Any], followers: str | None = None) -> tuple[Any, dict[str, str]]:
        if followers is None:
            raise PipelineError(f"stage {name} runs on rank 0 alone")
        if distributed.broadcast_flag(None) and followers == "compute":
            compute()
        outputs = json.loads(distributed.broadcast_bytes(None))
        for filename in sorted(outputs):
            (self.out / filename).write_bytes(distributed.broadcast_bytes(None))
        return restore(), outputs


def _model_digest(spec: str, config: LoadConfig) -> str:
    """sha256 that changes when the model or its architecture file changes."""
    parts = [spec]
    name = spec.removeprefix("zoo:")
    if name in ZOO:
        weights = ZOO[name].weights_path
        parts.append(sha256_file(weights) if weights.is_file() else "untrained")
    elif Path(spec).is_file():
        parts.append(sha256_file(Path(spec)))
    if config.arch and ":" in config.arch:
        arch_file = Path(config.arch.rsplit(":", 1)[0])
        if arch_file.is_file():
            parts.append(sha256_file(arch_file))
    return sha256_bytes("\n".join(parts).encode())


def load_teacher(spec: str, config: LoadConfig = LoadConfig(), capture_config: CaptureConfig = CaptureConfig()) -> Teacher:
    """Stages load and capture: a checked teacher graph from a zoo name or checkpoint."""
    loaded: LoadedModel = load_model(spec, config)
    return capture(loaded, capture_config)


def load_eval_data(config: EvalConfig, teacher_normalize) -> LabelledImages:
    """Real images for evaluation; the teacher's normalisation is used unless one is given."""
    path = PACKAGED_SUBSET if config.data == PACKAGED_DATA else config.data
    if path is None:
        raise PipelineError("no evaluation data given (--data / --eval-data)")
    return load_labelled_images(path, config.split, config.normalize or teacher_normalize, config.limit)


def _synth_config(config: BuildConfig):
    synth = _synth()
    base = config.synth if config.synth is not None else synth.SynthConfig()
    return dataclasses.replace(base, seed=config.seed)


def build(config: BuildConfig, out: Path, force: bool = False, progress: Progress = no_progress, log: Log = lambda message: None) -> BuildResult | None:
    """load → capture → synth → convert (→ privatize → binarize) → export, profile, audit (→ eval on real data), resuming where possible.

    Under torchrun (``edgesnn.distributed``) every rank calls this; rank 0 builds the bundle and
    returns its result, the other ranks help with synthesis and retraining and return None.

    The stages run in a staging folder beside ``out`` (``bundle.begin``); the
    finished folder is sealed (hashes, versions, signature, encryption) and
    renamed into place, so a failed build never leaves a half-bundle at ``out``.
    """
    destination = Path(out)
    keys = bundle.load_keys(config.seal)  # a bad key fails now, not after the build
    keep_freed_memory()
    if not distributed.is_main():
        scratch = Path(tempfile.mkdtemp(prefix=f"edgesnn-rank{distributed.rank()}-"))
        try:
            _run_stages(config, _Follower(scratch), scratch, force, progress)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return None
    out = bundle.begin(destination, force)
    run = _Run(out, force, log)
    trained = _run_stages(config, run, out, force, progress)
    return _finish(config, run, out, destination, keys, trained, progress)


@dataclass(frozen=True)
class _Trained:
    """What the stages up to the final model produced (``_run_stages``)."""

    teacher: Teacher
    synthetic: SyntheticSet
    converted: SpikingModel  # the converted SNN
    final: SpikingModel  # the final model: binary, else private, else converted
    final_file: str
    private: SpikingModel | None  # the retrained model before binarization, when --binary produced the final one
    digests: dict[str, str]  # sha256 of teacher.pt, synthetic.npz, snn.pt and the final model's file, by file name


def _run_stages(config: BuildConfig, run, out: Path, force: bool, progress: Progress) -> _Trained:
    """load → synth → convert (→ privatize → binarize): the stages every torchrun rank runs."""
    load_inputs = {"model": _model_digest(config.model, config.load)}
    teacher, teacher_outputs = run.stage(
        "load",
        {"model": config.model, "load": config.load},
        load_inputs,
        lambda: _compute_teacher(config),
        lambda: read_teacher(out / TEACHER_FILE),
        followers="receive",
    )

    synth_config = _synth_config(config)
    synthetic, synthetic_outputs = run.stage(
        "synth",
        {"synth": synth_config, **({"processes": distributed.world_size()} if distributed.active() else {})},  # each rank draws its own share
        {TEACHER_FILE: teacher_outputs[TEACHER_FILE]},
        lambda: _compute_synthetic(teacher, synth_config, progress, config.device),
        lambda: read_synthetic(out / SYNTHETIC_FILE),
        followers="compute",
    )

    convert_config = dataclasses.replace(config.convert, seed=config.seed)
    model, model_outputs = run.stage(
        "convert",
        {"convert": convert_config},
        {TEACHER_FILE: teacher_outputs[TEACHER_FILE], SYNTHETIC_FILE: synthetic_outputs[SYNTHETIC_FILE]},
        lambda: _compute_snn(teacher, synthetic, convert_config, progress),
        lambda: read_spiking(out / SNN_FILE),
        followers="receive",
    )

    converted, final, final_file, private_model = model, model, SNN_FILE, None
    if config.binarize is not None and config.privatize is None:
        raise PipelineError("--binary needs --private: binarization fine-tunes the retrained one-timestep model")
    if config.privatize is not None:
        private_config = _seeded(config.privatize, config.seed)
        private_rekey = config.rekey if config.binarize is None else None  # only the final model is re-keyed
        final, private_outputs = run.stage(
            "privatize",
            {"privatize": private_config, **({"rekey": private_rekey} if private_rekey else {})},
            {SNN_FILE: model_outputs[SNN_FILE], SYNTHETIC_FILE: synthetic_outputs[SYNTHETIC_FILE]},
            lambda: _compute_stage(PRIVATE_FILE, _rekeyed(privatize(model, teacher, synthetic, private_config, progress), private_rekey), "privatize"),
            lambda: read_spiking(out / PRIVATE_FILE),
            followers="compute",
        )
        final_file, final_digest = PRIVATE_FILE, private_outputs[PRIVATE_FILE]
        if config.binarize is not None:
            binary_config = _seeded(config.binarize, config.seed)
            private = private_model = final
            final, binary_outputs = run.stage(
                "binarize",
                {"binarize": binary_config, **({"rekey": config.rekey} if config.rekey else {})},
                {PRIVATE_FILE: private_outputs[PRIVATE_FILE], SYNTHETIC_FILE: synthetic_outputs[SYNTHETIC_FILE]},
                lambda: _compute_stage(BINARY_FILE, _rekeyed(binarize(private, teacher, synthetic, binary_config, progress), config.rekey), "binarize"),
                lambda: read_spiking(out / BINARY_FILE),
                followers="compute",
            )
            final_file, final_digest = BINARY_FILE, binary_outputs[BINARY_FILE]
    else:
        final_digest = model_outputs[SNN_FILE]
    digests = {TEACHER_FILE: teacher_outputs[TEACHER_FILE], SYNTHETIC_FILE: synthetic_outputs[SYNTHETIC_FILE], SNN_FILE: model_outputs[SNN_FILE], final_file: final_digest}
    return _Trained(teacher, synthetic, converted, final, final_file, private_model, digests)


def _finish(config: BuildConfig, run: _Run, out: Path, destination: Path, keys, trained: _Trained, progress: Progress) -> BuildResult:
    """Rank 0's stages after training: export, profile, audit, evaluation; then seal and publish the bundle."""
    teacher, synthetic, converted, final, final_file = trained.teacher, trained.synthetic, trained.converted, trained.final, trained.final_file
    final_digest = trained.digests[final_file]
    if config.targets is not None:
        _export_stage(run, final, final_file, final_digest, synthetic, config.targets)
    if config.profile:
        _profile_stage(run, teacher, final, final_file, final_digest, synthetic, trained.digests[SYNTHETIC_FILE], progress)
    if config.audit is not None:
        _audit_stage(run, teacher, final, final_file, final_digest, converted if final is not converted else None, trained.digests[SNN_FILE], trained.digests[TEACHER_FILE], dataclasses.replace(config.audit, seed=config.seed), progress)

    report = None
    if config.evaluation.data is not None:
        report = _evaluate_stage(run, config.evaluation, teacher, final, final_file, final_digest, progress)
    run.manifest["datasets_read_by_build"] = []  # load, synth, convert, privatize and binarize read no data set: data-free
    run.manifest["final_model"] = final_file
    run.manifest["final_model_bytes"] = model_bytes(final)
    run.manifest["teacher_fp32_bytes"] = teacher_bytes_fp32(teacher)
    run.save_manifest()
    bundle.seal(out, keys)
    bundle.publish(out, destination)
    out = destination
    return BuildResult(out, teacher, synthetic, final, report, converted if final is not converted else None, trained.private, run.stages, final_file)


GOLDEN_COUNT = 16  # synthetic images whose integer logits ship with the C firmware


def _export_stage(run: _Run, model: SpikingModel, model_file: str, model_digest: str, synthetic: SyntheticSet, targets: str) -> None:
    """Stage export: the final model in every chosen format, files recorded in the manifest."""
    from edgesnn.export import parse_targets

    chosen = parse_targets(targets, model)
    golden = synthetic.images[:GOLDEN_COUNT]
    run.stage(
        "export",
        {"targets": chosen, "golden_images": len(golden)},
        {model_file: model_digest},
        lambda: _compute_export(model, chosen, golden, f"edgesnn {__version__} from {model_file} (sha256 {model_digest[:16]})"),
        lambda: None,
    )


def _compute_export(model: SpikingModel, targets: list[str], golden_images: torch.Tensor, stamp: str):
    from edgesnn.export import ExportContext, export_files, pixels_from_images

    golden = pixels_from_images(golden_images, model.normalize) if model.timesteps == 1 else None
    context = ExportContext(model, stamp, golden)
    files = export_files(context, targets)
    return None, files, {"targets": targets, **context.notes}


def final_model_file(folder: Path) -> str:
    """The file of a build folder's final model: the manifest's ``final_model``, else the latest stage's."""
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            document = json.loads(manifest.read_text())
        except (OSError, ValueError, RecursionError):
            document = None
        name = document.get("final_model") if isinstance(document, dict) else None
        if isinstance(name, str) and name in (BINARY_FILE, PRIVATE_FILE, SNN_FILE) and (folder / name).is_file():
            return name
    for name in (BINARY_FILE, PRIVATE_FILE, SNN_FILE):
        if (folder / name).is_file():
            return name
    raise PipelineError(f"{folder}: no spiking model ({BINARY_FILE}, {PRIVATE_FILE} or {SNN_FILE}) in this folder")


def read_model_target(target: str) -> tuple[SpikingModel, str]:
    """A spiking model from a build folder (its final model) or a model file; and a name for stamps."""
    path = Path(target)
    if path.is_dir():
        name = final_model_file(path)
        return read_spiking(path / name), f"{path.name}/{name}"
    if path.is_file():
        return read_spiking(path), path.name
    raise PipelineError(f"{target}: no such build folder or model file")


def export_to(target: str, targets: str | None, out: Path) -> dict[str, Any]:
    """``edgesnn export``: write the chosen targets of a spiking model into ``out``; returns a summary."""
    from edgesnn.export import ExportContext, export_files, parse_targets

    model, name = read_model_target(target)
    chosen = parse_targets(targets, model)
    source = Path(target)
    digest = sha256_file(source / final_model_file(source) if source.is_dir() else source)
    golden = None
    if model.timesteps == 1 and source.is_dir() and (source / SYNTHETIC_FILE).is_file():
        from edgesnn.export import pixels_from_images

        golden = pixels_from_images(read_synthetic(source / SYNTHETIC_FILE).images[:GOLDEN_COUNT], model.normalize)
    context = ExportContext(model, f"edgesnn {__version__} from {name} (sha256 {digest[:16]})", golden)
    files = export_files(context, chosen)  # everything is computed before the first file is written
    written = {filename: write_atomic(out / filename, data) for filename, data in files.items()}
    return {"model": name, "timesteps": model.timesteps, "targets": chosen, "files": written, **context.notes}


def evaluate_bundle(folder: Path, images: LabelledImages, limit_c: int | None = None) -> dict[str, Any]:
    """Run the final model and every exported artifact of a build folder on real images.

    Reports, per runtime, accuracy and agreement with the PyTorch model (the
    float one-timestep SNN with its deployed int8/binary weights). For one-timestep models the integer reference
    (what the C firmware must equal bit for bit) is reported too, and the C
    logits are compared with it exactly.
    """
    from edgesnn.export import ARTIFACTS, RUNNERS, deployment_model, images_from_pixels, lower, pixels_from_images, run_reference

    from .privatize import snn_logits

    model, _ = read_model_target(str(folder))
    if model.timesteps == 1:
        model = deployment_model(model)  # what the artifacts compute (unchanged for a binarized model)
    pixels = pixels_from_images(torch.from_numpy(images.images), model.normalize)
    labels = torch.from_numpy(images.labels)
    inputs = images_from_pixels(pixels, model.normalize)  # the PyTorch model sees the rounded pixels every runtime sees
    reference_logits = snn_logits(model, inputs, model.timesteps)
    predictions = reference_logits.argmax(1)
    runtimes: dict[str, Any] = {"pytorch": {"accuracy": _fraction(predictions == labels), "images": len(labels)}}
    integer = None
    if model.timesteps == 1:
        integer = run_reference(lower(model), pixels)
        runtimes["integer_reference"] = {"accuracy": _fraction(integer.argmax(1) == labels), "agreement": _fraction(integer.argmax(1) == predictions), "images": len(labels)}
    for target, runner in RUNNERS.items():
        if not (folder / ARTIFACTS[target]).is_file():
            continue
        count = len(labels) if target != "c" or limit_c is None else min(limit_c, len(labels))
        logits = torch.from_numpy(np.asarray(runner(folder, model, pixels[:count])))
        entry = {"accuracy": _fraction(logits.argmax(1) == labels[:count]), "agreement": _fraction(logits.argmax(1) == predictions[:count]), "images": count}
        if target == "c" and integer is not None:
            entry["bit_exact"] = bool(torch.equal(logits.long(), integer[:count]))
            entry["bit_exact_images"] = int((logits.long() == integer[:count]).all(1).sum())
        runtimes[target] = entry
    return {"model": final_model_file(folder), "timesteps": model.timesteps, "runtimes": runtimes}


def _fraction(mask: torch.Tensor) -> float:
    return round(float(mask.float().mean()), 6) if len(mask) else float("nan")


def _seeded(stage_config, seed: int):
    """A privatize/binarize config with the build's seed in its training config."""
    return dataclasses.replace(stage_config, train=dataclasses.replace(stage_config.train, seed=seed))


def _compute_stage(filename: str, model: SpikingModel, stage: str):
    metrics = dict(model.metrics.get(stage, {}))
    if "rekey" in model.metrics:
        metrics["rekey"] = model.metrics["rekey"]
    return model, {filename: spiking_bytes(model)}, metrics


def _rekeyed(model: SpikingModel, config: RekeyConfig | None) -> SpikingModel:
    """The final private model with its thresholds re-keyed (an exact rewrite at T=1; see ``privatize.rekey_thresholds``)."""
    return model if config is None else rekey_thresholds(model, config)[0]


def _compute_teacher(config: BuildConfig):
    teacher = load_teacher(config.model, config.load)
    metrics = {"source": teacher.source, "nodes": len(teacher.graph.nodes), "neurons": len(teacher.graph.neurons()), "input_shape": teacher.input_shape, "num_classes": teacher.num_classes}
    return teacher, {TEACHER_FILE: teacher_bytes(teacher)}, metrics


def _compute_synthetic(teacher: Teacher, synth_config, progress: Progress, device: str = "cpu"):
    synth = _synth()
    synthetic = synth.synthesize(teacher, synth_config, progress, device)
    files = {SYNTHETIC_FILE: synthetic_bytes(synthetic), PREVIEW_FILE: synth.preview_png(synthetic, teacher.normalize)}
    return synthetic, files, dict(synthetic.metrics, method=synthetic.method, images=len(synthetic.labels))


def _compute_snn(teacher: Teacher, synthetic: SyntheticSet, convert_config: ConvertConfig, progress: Progress):
    model = convert(teacher, synthetic, convert_config, progress)
    return model, {SNN_FILE: spiking_bytes(model)}, model.metrics


def eval_timesteps(requested: tuple[int, ...], model: SpikingModel) -> list[int]:
    """The T values worth reporting: a model retrained for T steps is reported up to T (and at T)."""
    if "privatize" not in model.config:
        return list(requested)
    return sorted({t for t in requested if t <= model.timesteps} | {model.timesteps})


def _evaluate_stage(run: _Run, config: EvalConfig, teacher: Teacher, model: SpikingModel, model_file: str, model_digest: str, progress: Progress) -> EvalReport:
    """Evaluation reads real data, so it is recorded apart from the data-free stages and always rerun."""
    started = time.perf_counter()
    data = load_eval_data(config, teacher.normalize)
    report = evaluate(teacher, model, data, eval_timesteps(config.timesteps, model), progress)
    document = report_json(report)
    digest = write_atomic(run.out / EVAL_FILE, (json.dumps(document, indent=2) + "\n").encode())
    run.manifest["evaluation"] = {
        "data": report.source,
        "images": report.images,
        "inputs": {model_file: model_digest},
        "outputs": {EVAL_FILE: digest},
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_mb": peak_rss_mb(),
        "note": "real data is read for evaluation only, after the model is built",
    }
    run.stages["eval"] = {"seconds": run.manifest["evaluation"]["seconds"], "peak_rss_mb": run.manifest["evaluation"]["peak_rss_mb"], "resumed": False, "metrics": document}
    return report


def report_json(report: EvalReport) -> dict[str, Any]:
    """The documented JSON schema of an evaluation (accuracies as fractions)."""
    return {
        "ann_accuracy": round(report.ann_accuracy, 6),
        "snn_accuracy": {str(t): round(a, 6) for t, a in report.snn_accuracy.items()},
        "agreement": {str(t): round(a, 6) for t, a in report.agreement.items()},
        "images": report.images,
        "data": report.source,
        "seconds": report.seconds,
    }


# ---------------------------------------------------------------------------
# Single-stage commands


def resolve_model(target: str, load_config: LoadConfig = LoadConfig()) -> tuple[Teacher, SpikingModel | None]:
    """A build folder, an ``snn.pt``/``teacher.pt`` file, or an ANN (zoo name / checkpoint)."""
    path = Path(target)
    if path.is_dir():
        if (path / SNN_FILE).is_file():
            model = read_spiking(path / SNN_FILE)
            teacher = read_teacher(path / TEACHER_FILE) if (path / TEACHER_FILE).is_file() else teacher_of(model, str(path))
            return teacher, model
        if (path / TEACHER_FILE).is_file():
            return read_teacher(path / TEACHER_FILE), None
        raise PipelineError(f"{path}: folder holds neither {SNN_FILE} nor {TEACHER_FILE} (is it an edgesnn build output?)")
    if path.is_file() and path.suffix == ".pt" and load_config.arch is None:
        state = _peek_format(path)
        if state == "edgesnn-spiking-model":
            model = read_spiking(path)
            return teacher_of(model, str(path)), model
        if state == "edgesnn-teacher":
            return read_teacher(path), None
    return load_teacher(target, load_config), None


def _peek_format(path: Path) -> str | None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return state.get("format") if isinstance(state, dict) else None


def synthesize_to(teacher: Teacher, synth_config, out: Path, progress: Progress = no_progress) -> SyntheticSet:
    """``edgesnn synth``: write synthetic.npz, synthetic.png and teacher.pt into ``out``."""
    keep_freed_memory()
    synth = _synth()
    synthetic = synth.synthesize(teacher, synth_config, progress)
    write_atomic(out / TEACHER_FILE, teacher_bytes(teacher))
    write_atomic(out / SYNTHETIC_FILE, synthetic_bytes(synthetic))
    write_atomic(out / PREVIEW_FILE, synth.preview_png(synthetic, teacher.normalize))
    return synthetic


def convert_to(teacher: Teacher, synthetic: SyntheticSet, convert_config: ConvertConfig, out: Path, progress: Progress = no_progress) -> SpikingModel:
    """``edgesnn convert``: write snn.pt (and teacher.pt) into ``out``."""
    model = convert(teacher, synthetic, convert_config, progress)
    write_atomic(out / TEACHER_FILE, teacher_bytes(teacher))
    write_atomic(out / SNN_FILE, spiking_bytes(model))
    return model


def read_synthetic_source(path: Path) -> SyntheticSet:
    """A synthetic.npz, or a folder that holds one."""
    path = Path(path)
    return read_synthetic(path / SYNTHETIC_FILE if path.is_dir() else path)


# ---------------------------------------------------------------------------
# Hardware profile

PROFILE_FILE = "profile.json"
PROFILE_REPORT = "report.md"


def _profile_stage(run: _Run, teacher: Teacher, model: SpikingModel, model_file: str, model_digest: str, synthetic: SyntheticSet, synthetic_digest: str, progress: Progress) -> None:
    """Stage profile: counts, energy, latency and a quick crossbar Monte Carlo on the synthetic images."""
    from .profile import build_profile_config

    config = build_profile_config(model.timesteps)
    run.stage(
        "profile",
        {"profile": config},
        {model_file: model_digest, SYNTHETIC_FILE: synthetic_digest},
        lambda: _compute_profile(teacher, model, synthetic.images, None, config, f"{len(synthetic.images)} synthetic images (build)", progress),
        lambda: None,
    )


def _compute_profile(teacher: Teacher, model: SpikingModel, images: torch.Tensor, labels: torch.Tensor | None, config, source: str, progress: Progress):
    from .profile import profile, report_markdown

    result = profile(model, teacher, images, labels, config, source, progress)
    files = {PROFILE_FILE: (json.dumps(_jsonable(result.document), indent=2) + "\n").encode(), PROFILE_REPORT: report_markdown(result.document).encode(), **result.plots}
    summary = {"energy_ratio": result.document["energy_ratio"], "seconds": result.document["seconds"]}
    return result, files, summary


def profile_to(target: str, config, data: LabelledImages | None, out: Path | None, progress: Progress = no_progress) -> dict[str, Any]:
    """``edgesnn profile``: profile a build folder's final model (or a model file) on real images,
    or on the folder's synthetic images; write profile.json, report.md and plots into ``out`` if given."""
    model, name = read_model_target(target)
    folder = Path(target) if Path(target).is_dir() else None
    teacher = read_teacher(folder / TEACHER_FILE) if folder is not None and (folder / TEACHER_FILE).is_file() else teacher_of(model, name)
    if data is not None:
        images, labels, source = torch.from_numpy(data.images), torch.from_numpy(data.labels), data.source
    elif folder is not None and (folder / SYNTHETIC_FILE).is_file():
        images, labels, source = read_synthetic(folder / SYNTHETIC_FILE).images, None, f"{folder / SYNTHETIC_FILE} (synthetic)"
    else:
        raise PipelineError(f"{target}: no images to profile on; pass --data (e.g. --data packaged) or a build folder with {SYNTHETIC_FILE}")
    result, files, _ = _compute_profile(teacher, model, images, labels, config, source, progress)
    result.document["model"]["file"] = name
    result.document["model"]["ann"] = teacher.source
    if out is not None:
        files[PROFILE_FILE] = (json.dumps(_jsonable(result.document), indent=2) + "\n").encode()
        for filename, payload in files.items():
            write_atomic(out / filename, payload)
    return _jsonable(result.document)



# ---------------------------------------------------------------------------
# Privacy audit

AUDIT_FILE = "audit.json"
AUDIT_REPORT = "audit.md"


def audit_inverter(iterations: int = 200, tv_weight: float = 1e-2, l2_weight: float = 1e-3):
    """The attacker of ``edgesnn.audit``: ``edgesnn.synth.invert`` (class CE + image priors, no BN term)."""
    synth = _synth()

    def invert(network, labels, input_shape, normalize, seed, progress):
        config = synth.SynthConfig(
            count=len(labels), batch_size=min(128, len(labels)), iterations=iterations, min_iterations=iterations // 2,
            stop_confidence=0.99, tv_weight=tv_weight, l2_weight=l2_weight, seed=seed,
        )
        return synth.invert(network, labels, input_shape, normalize, config, lambda task, done, total: progress("invert", done, total))

    return invert


def load_judge(spec: str | None, teacher: Teacher | None):
    """``--judge``: a zoo judge name or any classifier spec; without one, the zoo judge of a zoo teacher, else None (the teacher judges)."""
    from .audit import Judge
    from .zoo import JUDGES, judge_for

    if spec is None:
        entry = judge_for(teacher.source.removeprefix("zoo:")) if teacher is not None and teacher.source.startswith("zoo:") else None
        if entry is None:
            return None
        spec = entry.name
    name = spec.removeprefix("zoo:")
    if name in JUDGES:
        entry = JUDGES[name]
        if not entry.weights_path.is_file():
            raise PipelineError(f"judge {name!r}: weights {entry.weights_path} missing (train them with scripts/train_zoo.py --models {name})")
        network = entry.factory()
        network.load_state_dict(torch.load(entry.weights_path, map_location="cpu", weights_only=True))
        return Judge(network.eval(), entry.normalize, f"zoo:{name} (test accuracy {entry.metadata.get('test_accuracy', 'unknown')})")
    judge_teacher = load_teacher(spec)
    return Judge(judge_teacher.network, judge_teacher.normalize, spec)


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise ArtifactError(f"{path}: not a readable manifest ({error})") from None
    return document if isinstance(document, dict) else None


def audit_to(
    target: str,
    teacher_spec: str | None = None,
    judge_spec: str | None = None,
    members: LabelledImages | None = None,
    non_members: LabelledImages | None = None,
    out: Path | None = None,
    config=None,
    inverter=None,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """``edgesnn audit``: audit a build folder's final model (or a model file); write audit.json, audit.md and PNG grids into ``out``.

    From a build folder the teacher (teacher.pt), the plain converted SNN (snn.pt) and
    the manifest are read as well; ``teacher_spec`` overrides the teacher.
    """
    from .audit import AuditConfig, MembershipData, audit

    model, name = read_model_target(target)
    folder = Path(target) if Path(target).is_dir() else None
    teacher = None
    if teacher_spec is not None:
        resolved, _ = resolve_model(teacher_spec)
        teacher = resolved
    elif folder is not None and (folder / TEACHER_FILE).is_file():
        teacher = read_teacher(folder / TEACHER_FILE)
    converted = read_spiking(folder / SNN_FILE) if folder is not None and (folder / SNN_FILE).is_file() and name != f"{folder.name}/{SNN_FILE}" else None
    membership = None
    if (members is None) != (non_members is None):
        raise PipelineError("membership inference needs both --members and --non-members")
    if members is not None:
        membership = MembershipData(
            torch.from_numpy(members.images), torch.from_numpy(members.labels), torch.from_numpy(non_members.images), torch.from_numpy(non_members.labels), f"members: {members.source}; non-members: {non_members.source}"
        )
    config = config or AuditConfig()
    result = audit(
        model, inverter or audit_inverter(config.iterations), teacher, converted, load_judge(judge_spec, teacher), membership,
        _read_manifest(folder) if folder is not None else None, config, progress,
    )
    files = _audit_files(result, name, teacher, model)
    if out is not None:
        for filename, payload in files.items():
            write_atomic(out / filename, payload)
    return json.loads(files[AUDIT_FILE])


def _audit_stage(run: _Run, teacher: Teacher, model: SpikingModel, model_file: str, model_digest: str, converted: SpikingModel | None, converted_digest: str, teacher_digest: str, config, progress: Progress) -> None:
    """Stage audit (``build --audit``): class leakage against the converted SNN and the teacher; no real data."""
    from .audit import audit

    inputs = {model_file: model_digest, TEACHER_FILE: teacher_digest}
    if converted is not None:
        inputs[SNN_FILE] = converted_digest

    def compute():
        judge = load_judge(None, teacher)
        result = audit(model, audit_inverter(config.iterations), teacher, converted, judge, None, run.manifest, config, progress)
        return result, _audit_files(result, model_file, teacher, model), {"privacy_gain": result.document["privacy_gain"], "seconds": result.document["seconds"]}

    run.stage("audit", {"audit": config}, inputs, compute, lambda: None)


def _audit_files(result, model_file: str, teacher: Teacher | None, model: SpikingModel) -> dict[str, bytes]:
    from .audit import report_markdown

    synth = _synth()
    document = _jsonable(result.document)
    document["model"] = {"file": model_file, "ann": teacher.source if teacher is not None else None}
    files = {AUDIT_FILE: (json.dumps(document, indent=2) + "\n").encode(), AUDIT_REPORT: report_markdown(document).encode()}
    for inversion in result.inversions:
        grid = SyntheticSet(inversion.images, inversion.labels, torch.zeros(len(inversion.labels), model.num_classes), f"audit {inversion.attack}", {})
        files[f"audit-{inversion.model}-{inversion.attack}.png"] = synth.preview_png(grid, model.normalize)
    return files
