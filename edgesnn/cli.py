"""The ``edgesnn`` command line (typer): parse, call one library function, render.

Exit codes: 0 success, 1 bad input (one line ``error: …`` on stderr), 2 usage
error, 130 interrupted. ``--json`` prints exactly one JSON document on stdout;
progress bars and tables go to stderr.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .convert import THRESHOLD_MODES, ConvertConfig
from .errors import EdgeSNNError
from .zoo import DEFAULT_ZOO_MODEL, ZOO

app = typer.Typer(
    help=(
        "edgesnn turns a pretrained PyTorch classifier into a spiking neural network without "
        "its training data: synthetic images are generated from the ANN alone, the SNN is "
        "calibrated on them, and accuracy is measured on real images you provide.\n\n"
        "Start with:  edgesnn build --eval-data packaged"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stderr = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of errors."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    """edgesnn: private one-timestep spiking networks for edge hardware."""
    _state["debug"] = debug
    if version:
        print(__version__)
        raise typer.Exit(0)


def _handle_errors(command: Callable) -> Callable:
    """Map a user's mistake to one line on stderr and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except EdgeSNNError as error:
            if _state["debug"]:
                raise
            stderr.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            stderr.print("[bold red]error:[/] interrupted; finished stages are kept and a rerun resumes from them", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


class _Bars:
    """Renders library progress callbacks as rich progress bars on stderr."""

    def __init__(self, enabled: bool = True):
        self.progress = Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr,
            disable=not enabled,
            transient=False,
        )
        self.tasks: dict[str, Any] = {}

    def __call__(self, task: str, done: int, total: int) -> None:
        if task not in self.tasks:
            self.tasks[task] = self.progress.add_task(task, total=total)
        self.progress.update(self.tasks[task], completed=done, total=total)

    def __enter__(self) -> "_Bars":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)


def _log(message: str) -> None:
    stderr.print(f"[dim]{message}[/]", highlight=False)


def _print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


def _load_config(arch: Optional[str], input_shape: Optional[str], trust_pickle: bool):
    from .load import LoadConfig, parse_input_shape

    return LoadConfig(arch=arch, input_shape=parse_input_shape(input_shape) if input_shape else None, trust_pickle=trust_pickle)


def _synth_config(count: int, method: str, iterations: Optional[int], batch_size: Optional[int], seed: int, bn_weight: Optional[float] = None, first_bn_weight: Optional[float] = None):
    from .synth import SynthConfig

    config = SynthConfig(count=count, method=method, seed=seed)
    if bn_weight is not None or first_bn_weight is not None:
        # One weighting for every image instead of the default mix of two.
        config = dataclasses.replace(config, bn_weightings=((1.0 if bn_weight is None else bn_weight, 10.0 if first_bn_weight is None else first_bn_weight),))
    if iterations is not None:
        # A smaller budget also lowers the floor before early stopping.
        config = dataclasses.replace(config, iterations=iterations, min_iterations=min(config.min_iterations, iterations))
    if batch_size is not None:
        config = dataclasses.replace(config, batch_size=batch_size)
    return config


def _parse_normalize(text: Optional[str]):
    from .datasets import parse_normalize

    return parse_normalize(text)


# Shared option declarations: the same flag means the same thing in every command.
ARCH = typer.Option(None, "--arch", help="Architecture for a state_dict checkpoint: a zoo name or path/to/model.py:factory.")
INPUT_SHAPE = typer.Option(None, "--input-shape", help="Input shape C,H,W when it cannot be inferred, e.g. 3,32,32.")
TRUST_PICKLE = typer.Option(False, "--trust-pickle", help="Allow loading a whole pickled nn.Module (runs code from the file: only for files you trust).")
SEED = typer.Option(0, "--seed", help="Seed of every random choice; same seed, same result.")
JSON = typer.Option(False, "--json", help="Print one JSON document on stdout (schema in README).")
COUNT = typer.Option(2048, "--count", min=1, help="Synthetic images to generate (class-balanced).")
METHOD = typer.Option("auto", "--method", help="Synthesis: auto, deepinversion (nets with BatchNorm) or data_impression.")
ITERATIONS = typer.Option(None, "--iterations", min=1, help="Maximum optimisation steps per synthetic batch (default: synth's).")
SYNTH_BATCH = typer.Option(None, "--synth-batch", min=1, help="Images optimised together (default: synth's).")
BN_WEIGHT = typer.Option(
    None, "--bn-weight", min=0.0,
    help="DeepInversion: weight of the BatchNorm-statistics term for every image (1 if only --first-bn-weight is given). Default: half the images at 1 (first layer ×10), half at 10 (every layer alike, the published CIFAR-10 weighting).",
)
FIRST_BN_WEIGHT = typer.Option(None, "--first-bn-weight", min=0.0, help="DeepInversion: extra factor on the first BatchNorm layer's term for every image (10 if only --bn-weight is given).")
TIMESTEPS_T = typer.Option(32, "--timesteps", min=1, help="Default number of SNN timesteps T.")
THRESHOLD_MODE = typer.Option("percentile", "--threshold-mode", help=f"Threshold calibration: {' or '.join(THRESHOLD_MODES)}.")
PERCENTILE = typer.Option(99.9, "--percentile", help="Percentile of positive activations used as threshold (mode percentile).")
PER_CHANNEL = typer.Option(True, "--per-channel/--per-layer", help="One threshold per channel, or one per layer.")
BIAS_CORRECTION = typer.Option(True, "--bias-correction/--no-bias-correction", help="Shift biases layer by layer so the SNN's mean outputs match the ANN's at T=--timesteps (on synthetic images).")
INITIAL_MEMBRANE = typer.Option(0.5, "--initial-membrane", help="Initial membrane potential as a fraction of the threshold.")
DATA_HELP = "Real labelled images: an IDX folder (MNIST layout, .gz or not), an .npz with x and y, a CIFAR-10 batches folder, or 'packaged' (2,000 Fashion-MNIST test images shipped with edgesnn)."
NORMALIZE = typer.Option(None, "--normalize", help="MEAN:STD per channel applied to pixels in [0,1], e.g. 0.485,0.456,0.406:0.229,0.224,0.225 (default: the model's own, if known).")
LIMIT = typer.Option(None, "--limit", min=1, help="Use only the first N images.")
TARGETS_HELP = "Export formats, comma-separated: onnx (model.onnx), c (c/: C99 firmware with 1-bit weights, `make -C c check`), tflite (model.tflite, int16x8), nir (model.nir for neuromorphic toolchains; bit widths in node metadata), or all (those the model allows; c, tflite and nir need T=1)."
SPLIT = typer.Option("test", "--split", help="Split of an IDX/CIFAR folder: test or train.")
PASSPHRASE_ENV = "EDGESNN_PASSPHRASE"
PASSPHRASE_HELP = f"Encrypt with a key derived from a passphrase (scrypt) instead of a key file; read from ${PASSPHRASE_ENV}, else asked for."


def _convert_config(timesteps: int, threshold_mode: str, percentile: float, per_channel: bool, bias_correction: bool, initial_membrane: float, seed: int) -> ConvertConfig:
    return ConvertConfig(
        timesteps=timesteps, threshold_mode=threshold_mode, percentile=percentile, per_channel=per_channel, bias_correction=bias_correction, initial_membrane=initial_membrane, seed=seed
    )


def _render_report(report) -> None:
    from .evaluate import accuracy_table

    table = Table(title=f"accuracy on {report.images} real images ({report.source})", title_justify="left")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    table.add_column("agrees with ANN", justify="right")
    for name, accuracy, agreement in accuracy_table(report):
        table.add_row(name, f"{accuracy:.2%}", "" if agreement is None else f"{agreement:.2%}")
    stderr.print(table)


@app.command("zoo")
@_handle_errors
def zoo_command(json_output: bool = JSON) -> None:
    """List the pretrained teachers shipped with edgesnn, with their measured test accuracy."""
    rows = []
    for entry in ZOO.values():
        metadata = entry.metadata
        rows.append(
            {
                "name": entry.name,
                "description": entry.description,
                "input_shape": list(entry.input_shape),
                "num_classes": entry.num_classes,
                "test_accuracy": metadata.get("test_accuracy"),
                "parameters": metadata.get("parameters"),
                "default": entry.name == DEFAULT_ZOO_MODEL,
                "trained": entry.weights_path.is_file(),
            }
        )
    if json_output:
        _print_json(rows)
        return
    table = Table(title="edgesnn zoo (Fashion-MNIST teachers)", title_justify="left")
    for column in ("name", "accuracy", "parameters", "input", "description"):
        table.add_column(column)
    for row in rows:
        accuracy = f"{row['test_accuracy']:.2%}" if row["test_accuracy"] is not None else "untrained"
        name = row["name"] + (" (default)" if row["default"] else "")
        table.add_row(name, accuracy, str(row["parameters"] or ""), "×".join(map(str, row["input_shape"])), row["description"])
    Console().print(table)


@app.command("synth")
@_handle_errors
def synth_command(
    model: str = typer.Argument(DEFAULT_ZOO_MODEL, help="Zoo name or checkpoint of the ANN."),
    out: Path = typer.Option(Path("out"), "--out", help="Folder for synthetic.npz, synthetic.png and teacher.pt."),
    count: int = COUNT,
    method: str = METHOD,
    iterations: Optional[int] = ITERATIONS,
    synth_batch: Optional[int] = SYNTH_BATCH,
    bn_weight: Optional[float] = BN_WEIGHT,
    first_bn_weight: Optional[float] = FIRST_BN_WEIGHT,
    seed: int = SEED,
    arch: Optional[str] = ARCH,
    input_shape: Optional[str] = INPUT_SHAPE,
    trust_pickle: bool = TRUST_PICKLE,
    json_output: bool = JSON,
) -> None:
    """Generate data-free synthetic images from the ANN alone (DeepInversion or Data Impression)."""
    from .pipeline import load_teacher, synthesize_to

    teacher = load_teacher(model, _load_config(arch, input_shape, trust_pickle))
    config = _synth_config(count, method, iterations, synth_batch, seed, bn_weight, first_bn_weight)
    with _Bars() as bars:
        synthetic = synthesize_to(teacher, config, out, bars)
    document = {"method": synthetic.method, "images": len(synthetic.labels), "out": str(out), **synthetic.metrics}
    if json_output:
        _print_json(document)
    else:
        stderr.print(f"{len(synthetic.labels)} images by {synthetic.method} → {out}/synthetic.npz; teacher agrees on {synthetic.metrics.get('target_agreement', float('nan')):.1%}")


@app.command("convert")
@_handle_errors
def convert_command(
    model: str = typer.Argument(DEFAULT_ZOO_MODEL, help="Zoo name, checkpoint, or a folder written by `edgesnn synth`."),
    synthetic: Optional[Path] = typer.Option(None, "--synthetic", help="synthetic.npz (or its folder) to calibrate on; default: MODEL's folder."),
    out: Path = typer.Option(Path("out"), "--out", help="Folder for snn.pt and teacher.pt."),
    timesteps: int = TIMESTEPS_T,
    threshold_mode: str = THRESHOLD_MODE,
    percentile: float = PERCENTILE,
    per_channel: bool = PER_CHANNEL,
    bias_correction: bool = BIAS_CORRECTION,
    initial_membrane: float = INITIAL_MEMBRANE,
    seed: int = SEED,
    arch: Optional[str] = ARCH,
    input_shape: Optional[str] = INPUT_SHAPE,
    trust_pickle: bool = TRUST_PICKLE,
    json_output: bool = JSON,
) -> None:
    """Convert the ANN into an integrate-and-fire SNN calibrated on synthetic images."""
    from .errors import PipelineError
    from .pipeline import convert_to, read_synthetic_source, resolve_model

    teacher, _ = resolve_model(model, _load_config(arch, input_shape, trust_pickle))
    source = synthetic if synthetic is not None else (Path(model) if Path(model).is_dir() else None)
    if source is None:
        raise PipelineError("no synthetic images: pass --synthetic path/to/synthetic.npz (made by `edgesnn synth`)")
    images = read_synthetic_source(source)
    config = _convert_config(timesteps, threshold_mode, percentile, per_channel, bias_correction, initial_membrane, seed)
    with _Bars() as bars:
        snn = convert_to(teacher, images, config, out, bars)
    document = {"out": str(out), "timesteps": snn.timesteps, **snn.metrics}
    if json_output:
        _print_json(document)
    else:
        stderr.print(f"SNN with {len(snn.thresholds)} spiking layers → {out}/snn.pt")


@app.command("eval")
@_handle_errors
def eval_command(
    target: str = typer.Argument(..., help="A build folder, an snn.pt, or an ANN (zoo name/checkpoint: converted on the fly)."),
    data: str = typer.Option(..., "--data", help=DATA_HELP),
    normalize: Optional[str] = NORMALIZE,
    limit: Optional[int] = LIMIT,
    split: str = SPLIT,
    timesteps: str = typer.Option("1,2,4,8,16,32,64", "--timesteps", help="Comma-separated T values to report."),
    count: int = COUNT,
    seed: int = SEED,
    arch: Optional[str] = ARCH,
    input_shape: Optional[str] = INPUT_SHAPE,
    trust_pickle: bool = TRUST_PICKLE,
    json_output: bool = JSON,
) -> None:
    """Report ANN and SNN accuracy on real images for each T.

    On a build folder with exported artifacts it also runs each of them (ONNX
    in onnxruntime, the C firmware compiled with the local compiler) and
    reports its accuracy and agreement with the PyTorch model; the C logits are
    compared bit for bit with edgesnn's integer reference.
    """
    from .convert import convert
    from .evaluate import evaluate, parse_timesteps
    from .pipeline import EvalConfig, load_eval_data, report_json, resolve_model
    from .synth import synthesize

    steps = parse_timesteps(timesteps)
    config = EvalConfig(data=data, normalize=_parse_normalize(normalize), limit=limit, split=split, timesteps=tuple(steps))
    teacher, snn = resolve_model(target, _load_config(arch, input_shape, trust_pickle))
    images = load_eval_data(config, teacher.normalize)
    with _Bars() as bars:
        if snn is None:
            synthetic = synthesize(teacher, _synth_config(count, "auto", None, None, seed), bars)
            snn = convert(teacher, synthetic, ConvertConfig(seed=seed), bars)
        report = evaluate(teacher, snn, images, steps, bars)
    bundle = _bundle_runtimes(target, images)
    if json_output:
        document = report_json(report)
        if bundle is not None:
            document["runtimes"] = bundle["runtimes"]
        _print_json(document)
    else:
        _render_report(report)
        if bundle is not None:
            _render_runtimes(bundle)


def _bundle_runtimes(target: str, images) -> dict | None:
    """Per-runtime figures of a build folder whose model was exported; None for anything else."""
    from .pipeline import MANIFEST, evaluate_bundle

    folder = Path(target)
    if not folder.is_dir() or not (folder / MANIFEST).is_file():
        return None
    from .bundle import read_manifest

    stages = read_manifest(folder).get("stages")
    if not isinstance(stages, dict) or "export" not in stages:
        return None
    return evaluate_bundle(folder, images)


def _render_runtimes(bundle: dict) -> None:
    table = Table(title=f"{bundle['model']} (T={bundle['timesteps']}) in each runtime", title_justify="left")
    for column in ("runtime", "images", "accuracy", "agrees with PyTorch", "bit-exact with integer reference"):
        table.add_column(column, justify="left" if column == "runtime" else "right")
    for name, entry in bundle["runtimes"].items():
        exact = entry.get("bit_exact")
        table.add_row(
            name,
            str(entry["images"]),
            f"{entry['accuracy']:.2%}",
            f"{entry['agreement']:.2%}" if "agreement" in entry else "",
            "" if exact is None else ("yes" if exact else f"no ({entry['bit_exact_images']} of {entry['images']})"),
        )
    stderr.print(table)


@app.command("export")
@_handle_errors
def export_command(
    target: str = typer.Argument(..., help="A build folder (its final model) or a spiking model file (snn.pt, private.pt, binary.pt)."),
    targets: str = typer.Option("all", "--targets", help=TARGETS_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: the build folder itself, else ./edgesnn-export)."),
    json_output: bool = JSON,
) -> None:
    """Export a spiking model for deployment: ONNX and C firmware with bit-packed binary layers.

    The C folder builds with `make` (C99, -Wall -Wextra -Werror) into a harness that reads raw
    uint8 images and prints int64 logits; `make check` compares them with golden logits.
    Check every artifact on real images with: edgesnn eval FOLDER --data …
    """
    from .pipeline import export_to

    folder = out if out is not None else (Path(target) if Path(target).is_dir() else Path("edgesnn-export"))
    summary = export_to(target, targets, folder)
    summary["out"] = str(folder)
    if json_output:
        _print_json(summary)
        return
    table = Table(title=f"{summary['model']} (T={summary['timesteps']}) → {folder}", title_justify="left")
    table.add_column("file")
    table.add_column("bytes", justify="right")
    for name in summary["files"]:
        table.add_row(name, f"{(folder / name).stat().st_size:,}")
    stderr.print(table)
    if "c" in summary:
        stderr.print(f"C firmware: {summary['c']['constant_bytes']:,} bytes of constants, {summary['c']['arena_bytes']:,} bytes of static RAM (arena); build with: make -C {folder / 'c'}")


@app.command("profile")
@_handle_errors
def profile_command(
    target: str = typer.Argument(..., help="A build folder (its final model) or a spiking model file (snn.pt, private.pt, binary.pt)."),
    target_hardware: Optional[list[str]] = typer.Option(None, "--target", help="Hardware target: asic45nm, cortex_m4, crossbar, or a TOML file (repeatable; default: every built-in target)."),
    crossbar: Optional[int] = typer.Option(None, "--crossbar", help="Simulate the model on crossbar tiles of this size (64, 128 or 256): Monte Carlo accuracy under the non-idealities below."),
    variation: float = typer.Option(0.0, "--variation", min=0.0, help="Device-to-device variation: lognormal sigma of every conductance."),
    faults: float = typer.Option(0.0, "--faults", min=0.0, max=1.0, help="Share of cells stuck at ON or OFF."),
    stuck_on_share: float = typer.Option(0.5, "--stuck-on-share", min=0.0, max=1.0, help="Share of stuck cells stuck at ON (the rest OFF)."),
    read_noise: float = typer.Option(0.0, "--read-noise", min=0.0, help="Read-to-read noise of each cell, relative sigma, drawn at every read."),
    adc_bits: Optional[int] = typer.Option(None, "--adc-bits", min=2, max=16, help="ADC resolution per column (default: ideal readout)."),
    on_off_ratio: float = typer.Option(100.0, "--on-off-ratio", help="G_on / G_off of the cells."),
    ir_drop: float = typer.Option(0.0, "--ir-drop", min=0.0, help="Conductance lost at a tile's far corner (first-order IR drop), e.g. 0.05."),
    trials: int = typer.Option(100, "--trials", min=1, help="Monte Carlo trials (device instances)."),
    sweep: bool = typer.Option(True, "--sweep/--no-sweep", help="With --crossbar: sweep variation, fault rate and ADC bits and plot each."),
    sweep_trials: int = typer.Option(20, "--sweep-trials", min=1, help="Trials per sweep point."),
    compare_timesteps: str = typer.Option("", "--compare-timesteps", help="With --crossbar: also simulate these T values under the same devices, e.g. 1,4,8."),
    timesteps: Optional[int] = typer.Option(None, "--timesteps", min=1, help="T of the SNN run (default: the model's own)."),
    data: Optional[str] = typer.Option(None, "--data", help="Real labelled images to count on (default: the build folder's synthetic images). " + DATA_HELP),
    normalize: Optional[str] = NORMALIZE,
    limit: Optional[int] = LIMIT,
    split: str = SPLIT,
    out: Optional[Path] = typer.Option(None, "--out", help="Write profile.json, report.md and the plots into this folder."),
    seed: int = SEED,
    json_output: bool = JSON,
) -> None:
    """Hardware profile: MACs/ACs, spike rates, memory, energy and latency per target; crossbar robustness.

    energy_ratio = ANN energy / SNN energy per target. Every constant and its source is listed
    in report.md (--out) and under "constants" in the JSON.
    """
    from .crossbar import CrossbarConfig, SweepConfig
    from .evaluate import parse_timesteps
    from .pipeline import EvalConfig, load_eval_data, profile_to, read_model_target
    from .profile import TARGETS, ProfileConfig

    crossbar_config = None
    if crossbar is not None:
        crossbar_config = CrossbarConfig(
            tile_size=crossbar, variation=variation, faults=faults, stuck_on_share=stuck_on_share, read_noise=read_noise, adc_bits=adc_bits, on_off_ratio=on_off_ratio, ir_drop=ir_drop, trials=trials, seed=seed, timesteps=timesteps
        )
        from .crossbar import check_config

        check_config(crossbar_config)
    config = ProfileConfig(
        targets=tuple(target_hardware) if target_hardware else tuple(TARGETS),
        timesteps=timesteps,
        crossbar=crossbar_config,
        sweeps=SweepConfig(trials=sweep_trials) if crossbar is not None and sweep else None,
        compare_timesteps=tuple(parse_timesteps(compare_timesteps)) if compare_timesteps.strip() else (),
    )
    images = None
    if data is not None:
        model, _ = read_model_target(target)
        images = load_eval_data(EvalConfig(data=data, normalize=_parse_normalize(normalize), limit=limit, split=split), model.normalize)
    with _Bars(enabled=not json_output) as bars:
        document = profile_to(target, config, images, out, bars)
    if json_output:
        _print_json(document)
        return
    table = Table(title=f"hardware profile of {document['model'].get('file', target)} (T={document['snn']['timesteps']}, {document['images']} images)", title_justify="left")
    for column in ("target", "ANN energy", "SNN energy", "energy ratio", "ANN latency", "SNN latency"):
        table.add_column(column, justify="left" if column == "target" else "right")
    for name, entry in document["targets"].items():
        table.add_row(name, f"{entry['ann_energy_uj']:.4g} µJ", f"{entry['snn_energy_uj']:.4g} µJ", f"{entry['energy_ratio']:.2f}×", f"{entry['ann_latency_ms']:.4g} ms", f"{entry['snn_latency_ms']:.4g} ms")
    stderr.print(table)
    snn = document["snn"]
    stderr.print(f"ANN {document['ann']['macs']:,} MACs; SNN {snn['macs']:,} MACs + {snn['acs']:,.0f} ACs, spike rate {snn['spike_rate']:.4f}, weights {snn['weight_bytes']:,} B, peak arena {snn['memory']['peak_bytes']:,} B")
    if "crossbar" in document:
        mc = document["crossbar"]["monte_carlo"]
        metric = document["crossbar"]["metric"]
        stats = mc[metric]
        stderr.print(f"crossbar ({document['crossbar']['mapping']['tiles']} tiles of {crossbar}): {metric} {stats['mean']:.4f} (95% CI {stats['ci95'][0]:.4f}–{stats['ci95'][1]:.4f}) over {mc['trials']} trials × {mc['images']} images; ideal {mc['ideal_accuracy']}")
    if out is not None:
        stderr.print(f"report → {out / 'report.md'}")


def _audit_config():
    from .audit import AuditConfig

    return AuditConfig()


@app.command("audit")
@_handle_errors
def audit_command(
    target: str = typer.Argument(..., help="A build folder or bundle (its final model; teacher.pt, snn.pt and the manifest are read too) or a spiking model file."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="The ANN (zoo name, checkpoint, teacher.pt): baseline of attack 1 (default: the folder's teacher.pt)."),
    judge: Optional[str] = typer.Option(None, "--judge", help="Independent classifier that scores inversions: zoo judge name (fmnist_judge) or a model spec (default: the zoo judge of a zoo teacher, else the teacher)."),
    members: Optional[str] = typer.Option(None, "--members", help="Images the teacher was trained on, DATA[:split], e.g. /usr/share/datasets/fashion-mnist:train. " + DATA_HELP),
    non_members: Optional[str] = typer.Option(None, "--non-members", help="Images it never saw, DATA[:split], e.g. /usr/share/datasets/fashion-mnist:test."),
    limit: int = typer.Option(2000, "--limit", min=1, help="Members and non-members used (the first N of each)."),
    images_per_class: int = typer.Option(10, "--images-per-class", min=1, help="Inverted images per class and attack."),
    attack_timesteps: int = typer.Option(4, "--attack-timesteps", min=1, help="T of the surrogate-gradient attack (the model's own T if smaller)."),
    iterations: int = typer.Option(200, "--iterations", min=2, help="Inversion steps per image."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write audit.json, audit.md and the inverted-image grids here (default: the build folder; for a signed bundle, FOLDER-audit beside it)."),
    seed: int = SEED,
    json_output: bool = JSON,
) -> None:
    """Privacy audit: class leakage by two inversion attacks, weight similarity, data leakage, membership inference.

    attack_success = share of inverted images the judge classifies as their class (chance: 1/classes).
    """
    from .audit import AuditConfig, summary
    from .pipeline import EvalConfig, audit_to, load_eval_data, read_model_target

    def data(spec: Optional[str], normalize):
        if spec is None:
            return None
        path, _, split = spec.rpartition(":") if spec.endswith((":train", ":test")) else (spec, "", "test")
        return load_eval_data(EvalConfig(data=path, limit=limit, split=split), normalize)

    model, _ = read_model_target(target)
    member_set, non_member_set = data(members, model.normalize), data(non_members, model.normalize)
    if out is None and Path(target).is_dir():
        from .bundle import SIGNATURE_FILE

        # A sealed bundle stays as signed: files added to it would show up as "extra" in verify.
        out = Path(target) if not (Path(target) / SIGNATURE_FILE).is_file() else Path(str(Path(target).resolve()) + "-audit")
    config = AuditConfig(images_per_class=images_per_class, iterations=iterations, attack_timesteps=attack_timesteps, seed=seed)
    with _Bars(enabled=not json_output) as bars:
        document = audit_to(target, teacher, judge, member_set, non_member_set, out, config, None, bars)
    if json_output:
        _print_json(summary(document))
        return
    table = Table(title=f"privacy audit of {document['model']['file']} (judge: {document['judge']})", title_justify="left")
    for column in ("attack", "model", "attack success", "chance"):
        table.add_column(column, justify="left" if column in ("attack", "model") else "right")
    for attack, entries in document["attacks"].items():
        for name, entry in entries.items():
            table.add_row(attack, name, f"{entry['attack_success']:.1%}", f"{entry['chance']:.1%}")
    stderr.print(table)
    stderr.print(f"data leakage: {document['data_leakage']['statement']}")
    if "membership" in document:
        for name in ("deployed", "ann"):
            if name in document["membership"]:
                m = document["membership"][name]
                stderr.print(f"membership inference ({name}): loss AUC {m['loss_auc']:.3f}, confidence AUC {m['confidence_auc']:.3f}")
    if out is not None:
        stderr.print(f"audit → {out / 'audit.json'}")


@app.command("build")
@_handle_errors
def build_command(
    model: str = typer.Argument(DEFAULT_ZOO_MODEL, help="Zoo name or checkpoint of the ANN (default: the default zoo model)."),
    out: Path = typer.Option(Path("out"), "--out", help="Output folder; a rerun resumes from its finished stages."),
    force: bool = typer.Option(False, "--force", help="Recompute every stage, ignoring finished ones in --out."),
    private: bool = typer.Option(False, "--private", help="Retrain the SNN through time on synthetic images (PrivateSNN) and reduce it to --timesteps (default 1)."),
    binary: bool = typer.Option(False, "--binary", help="Binarize layers adaptively within --max-loss (ALBSNN); the rest int8. Needs --private."),
    budget: str = typer.Option("standard", "--budget", help="Iteration counts: fast (~3 min), standard (≤10 min) or thorough (≤60 min) on 2 CPU cores."),
    device: str = typer.Option("cpu", "--device", help="Where retraining runs: cpu or cuda."),
    precision: str = typer.Option(
        "auto",
        "--precision",
        help="Arithmetic of the training's convolutions and linear layers: fp32, bf16 (retraining ~1.4x faster on a CPU with avx512_bf16 or AMX, same accuracy in BENCHMARKS.md; neurons, norms, losses and weights stay float32), or auto (bf16 where the CPU has it natively, else fp32). The manifest records which.",
    ),
    count: Optional[int] = typer.Option(None, "--count", min=1, help="Synthetic images to generate (default: the budget's; 2048 for standard)."),
    method: str = METHOD,
    iterations: Optional[int] = ITERATIONS,
    synth_batch: Optional[int] = SYNTH_BATCH,
    bn_weight: Optional[float] = BN_WEIGHT,
    first_bn_weight: Optional[float] = FIRST_BN_WEIGHT,
    timesteps: Optional[int] = typer.Option(None, "--timesteps", min=1, help="T of the final model: default 32 for a converted SNN, 1 with --private."),
    coding: str = typer.Option("direct", "--coding", help="Input coding during temporal retraining (T>1): direct or rate (Bernoulli spikes)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=0, help="With --private: training steps at the final T (default: the budget's; T>1 phases get a tenth each)."),
    binary_steps: Optional[int] = typer.Option(None, "--binary-steps", min=0, help="With --binary: fine-tuning steps after each binarized layer (default: the budget's; the final fine-tune gets 4×)."),
    max_loss: float = typer.Option(6.0, "--max-loss", min=0.0, help="With --binary: agreement points (teacher vs SNN, held-out synthetic images) binarization may cost; lower keeps more layers int8."),
    binary_fraction: Optional[float] = typer.Option(None, "--binary-fraction", min=0.0, max=1.0, help="With --binary: stop once this share of weights is 1-bit."),
    size_ratio: Optional[float] = typer.Option(
        None,
        "--size-ratio",
        min=0.0,
        help="With --binary: after the layer search, make the output channels binarization hurts most int8 again while the model stays at least this many times smaller than the fp32 teacher (default: 15 for --budget thorough, off otherwise; 0 turns it off).",
    ),
    threshold_mode: str = THRESHOLD_MODE,
    percentile: float = PERCENTILE,
    per_channel: bool = PER_CHANNEL,
    bias_correction: bool = BIAS_CORRECTION,
    initial_membrane: float = INITIAL_MEMBRANE,
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="After the build, measure accuracy on real images. " + DATA_HELP),
    eval_normalize: Optional[str] = typer.Option(None, "--eval-normalize", help="MEAN:STD for --eval-data (default: the model's own, if known)."),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", min=1, help="Evaluate on the first N images only."),
    eval_timesteps: str = typer.Option("1,2,4,8,16,32,64", "--eval-timesteps", help="T values to report with --eval-data (a retrained model: those up to its T)."),
    targets: str = typer.Option("all", "--targets", help=TARGETS_HELP + " 'none' skips the export."),
    rekey: bool = typer.Option(True, "--rekey/--no-rekey", help="With --private at T=1: re-key the thresholds of the final model with a random per-channel key (an exact rewrite: same spikes; the weights no longer read back as the ANN)."),
    rekey_seed: Optional[int] = typer.Option(None, "--rekey-seed", help="Draw the re-keying key from this seed (reproducible, but known to whoever knows the seed); default: a secret key from the OS, never stored."),
    audit: bool = typer.Option(False, "--audit", help="Privacy audit of the final model into the bundle (audit.json, audit.md, inverted-image grids; ~1 min on 2 cores); `edgesnn audit` for membership inference."),
    sign_key: Optional[Path] = typer.Option(None, "--sign-key", help="Sign the bundle's manifest with this Ed25519 private key (from `edgesnn keygen`)."),
    encrypt_key: Optional[Path] = typer.Option(None, "--encrypt-key", help="Encrypt the weight-bearing artifacts with AES-256-GCM under this 32-byte key file (`edgesnn keygen --aes`)."),
    encrypt_passphrase: bool = typer.Option(False, "--encrypt-passphrase", help=PASSPHRASE_HELP),
    seed: int = SEED,
    arch: Optional[str] = ARCH,
    input_shape: Optional[str] = INPUT_SHAPE,
    trust_pickle: bool = TRUST_PICKLE,
    json_output: bool = JSON,
) -> None:
    """Run the whole job: load → synthesise images → convert to an SNN (→ retrain → binarize) (→ evaluate on real data).

    edgesnn build --private --binary makes a one-timestep SNN with mostly 1-bit weights.
    The build itself never reads a dataset; --eval-data is only used to report accuracy afterwards.
    """
    from . import distributed
    from .errors import PipelineError
    from .evaluate import parse_timesteps
    from .pipeline import BUDGETS, BuildConfig, EvalConfig, build
    from .privatize import CODINGS, RekeyConfig, check_device, resolve_precision

    check_device(device)
    precision = resolve_precision(precision, device)
    if budget not in BUDGETS:
        raise PipelineError(f"--budget {budget!r} is unknown; valid: {', '.join(BUDGETS)}")
    if coding not in CODINGS:
        raise PipelineError(f"--coding {coding!r} is unknown; valid: {', '.join(CODINGS)}")
    if binary and not private:
        raise PipelineError("--binary needs --private: binarization fine-tunes the retrained one-timestep model")
    preset = BUDGETS[budget]
    if steps is not None:
        preset = dataclasses.replace(preset, final_steps=steps, temporal_steps=steps // 10)
    if binary_steps is not None:
        preset = dataclasses.replace(preset, binarize_step_steps=binary_steps, binarize_final_steps=4 * binary_steps)
    if size_ratio is not None:
        if 0 < size_ratio < 1:
            raise PipelineError(f"--size-ratio {size_ratio}: the model cannot be larger than the fp32 teacher (give a ratio ≥ 1, or 0 for off)")
        preset = dataclasses.replace(preset, size_ratio=size_ratio or None)
    steps = parse_timesteps(eval_timesteps)
    with distributed.joined(device) as device:  # under torchrun: the process group (cuda: this rank's GPU)
        final_timesteps = timesteps if timesteps is not None else (1 if private else 32)
        privatize_config = None
        convert_timesteps = final_timesteps
        if private:
            privatize_config = preset.privatize_config(final_timesteps, coding, device, seed, precision)
            # Bias correction targets the first training phase's T.
            convert_timesteps = max([final_timesteps, *privatize_config.schedule])
        binarize_config = preset.binarize_config(max_loss, binary_fraction, device, seed, precision) if binary else None
        config = BuildConfig(
            model=model,
            load=_load_config(arch, input_shape, trust_pickle),
            synth=_synth_config(count if count is not None else preset.synth_count, method, iterations, synth_batch, seed, bn_weight, first_bn_weight),
            convert=_convert_config(convert_timesteps, threshold_mode, percentile, per_channel, bias_correction, initial_membrane, seed),
            privatize=privatize_config,
            binarize=binarize_config,
            rekey=RekeyConfig(seed=rekey_seed) if rekey else None,
            evaluation=EvalConfig(data=eval_data, normalize=_parse_normalize(eval_normalize), limit=eval_limit, timesteps=tuple(steps)),
            targets=None if targets.strip() == "none" else targets,
            seed=seed,
            audit=_audit_config() if audit else None,
            seal=_seal_config(sign_key, encrypt_key, encrypt_passphrase),
            device=device,
        )
        if not distributed.is_main():
            build(config, out, force)  # another torchrun rank: synthesis and retraining with rank 0, no output
            return
        with _Bars() as bars:
            result = build(config, out, force, bars, _log)
        document = build_document(result, model, budget, precision if private else None)
        if distributed.active():
            document["processes"] = distributed.world_size()
        if json_output:
            _print_json(document)
            return
        _render_build(result, document)


def build_document(result, model: str, budget: str, precision: str | None = None) -> dict[str, Any]:
    """The JSON schema of ``build --json`` (see README)."""
    from .binarize import binary_share, model_bytes
    from .pipeline import report_json, teacher_bytes_fp32

    final = result.model
    deployed_bytes = model_bytes(final)
    teacher_bytes = teacher_bytes_fp32(result.teacher)
    private_metrics = final.metrics.get("privatize", {})
    binary_metrics = final.metrics.get("binarize", {})
    cosine = private_metrics.get("weight_cosine_after", {})
    if binary_metrics:
        from .privatize import weight_cosines

        if result.converted is not None:
            cosine = weight_cosines(result.converted.graph, final)
    layers = {}
    for node in final.graph.weighted():
        entry = {"weight_format": node.attrs.get("weight_format", "float"), "weights": node.params["weight"].numel(), "binarized": node.attrs.get("weight_format") == "binary"}
        if entry["weight_format"] == "mixed":
            entry.update(binary_channels=len(node.attrs["binary_rows"]), channels=node.params["weight"].shape[0])
        entry.update({k: v for k, v in binary_metrics.get("layers", {}).get(node.name, {}).items() if k in ("weight_error", "agreement_drop", "fixed")})
        if node.name in cosine:
            entry["cosine_to_ann"] = cosine[node.name]
        layers[node.name] = entry
    document: dict[str, Any] = {
        "out": str(result.out),
        "model": model,
        "teacher": result.teacher.source,
        "budget": budget,
        **({"precision": precision} if precision else {}),
        "final_model": result.final_file,
        "synthetic": {"method": result.synthetic.method, "images": len(result.synthetic.labels), **result.synthetic.metrics},
        "timesteps": final.timesteps,
        "binary_fraction": round(binary_share(final), 5),
        "model_bytes": deployed_bytes,
        "teacher_fp32_bytes": teacher_bytes,
        "size_ratio": round(teacher_bytes / max(1, deployed_bytes), 3),
        "layers": layers,
        "stages": {name: {"seconds": s["seconds"], "peak_rss_mb": s["peak_rss_mb"], "resumed": s["resumed"]} for name, s in result.stages.items()},
    }
    if binary_metrics:
        document["binarize_steps"] = binary_metrics.get("steps", [])
        if binary_metrics.get("channels_back"):
            document["channels_back"] = binary_metrics["channels_back"]
    rekey = final.metrics.get("rekey")
    if rekey is not None:
        document["rekey"] = {k: rekey[k] for k in ("rekeyed", "span", "key", "skipped", "reason") if k in rekey}
    if "export" in result.stages:
        document["export"] = result.stages["export"]["metrics"]
    if result.report is not None:
        document.update(report_json(result.report))
    return document


def _render_build(result, document: dict[str, Any]) -> None:
    table = Table(title=f"edgesnn build → {result.out}", title_justify="left")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("peak RSS MiB", justify="right")
    table.add_column("")
    for name, stage in result.stages.items():
        table.add_row(name, f"{stage['seconds']:.1f}", f"{stage['peak_rss_mb']:.0f}", "resumed" if stage["resumed"] else "")
    stderr.print(table)
    metrics = result.synthetic.metrics
    stderr.print(
        f"synthetic: {len(result.synthetic.labels)} images by {result.synthetic.method}, teacher agrees on "
        f"{metrics.get('target_agreement', float('nan')):.1%}, {metrics.get('images_per_second', float('nan')):.1f} images/s"
    )
    if result.final_file != "snn.pt":
        layers = Table(title=f"final model {result.final_file}: T={document['timesteps']}, {document['binary_fraction']:.1%} of weights 1-bit, {document['size_ratio']:.1f}× smaller than the fp32 teacher", title_justify="left")
        for column in ("layer", "weights", "format", "agreement drop (pts)", "weight error", "cosine to ANN"):
            layers.add_column(column, justify="right" if column != "layer" else "left")
        for name, layer in document["layers"].items():
            drop = layer.get("agreement_drop")
            error = layer.get("weight_error")
            layers.add_row(
                name,
                str(layer["weights"]),
                layer["weight_format"] + (" (fixed)" if layer.get("fixed") else "") + (f" ({layer['binary_channels']}/{layer['channels']} channels 1-bit)" if layer["weight_format"] == "mixed" else ""),
                "" if drop is None else f"{drop:.1f}",
                "" if error is None else f"{error:.3f}",
                f"{layer['cosine_to_ann']:.3f}" if "cosine_to_ann" in layer else "",
            )
        stderr.print(layers)
    if result.report is not None:
        _render_report(result.report)
    else:
        stderr.print("add --eval-data PATH (or --eval-data packaged) to measure accuracy on real images")


# ---------------------------------------------------------------------------
# Bundle security: keygen, verify, decrypt


def _passphrase(confirm: bool) -> str:
    """The passphrase from $EDGESNN_PASSPHRASE, else asked for on the terminal (not echoed)."""
    import os

    text = os.environ.get(PASSPHRASE_ENV)
    if text is None:
        text = typer.prompt("passphrase", hide_input=True, confirmation_prompt=confirm, err=True)
    return text


def _seal_config(sign_key: Optional[Path], encrypt_key: Optional[Path], encrypt_passphrase: bool):
    from .bundle import SealConfig
    from .errors import BundleError

    if encrypt_key is not None and encrypt_passphrase:
        raise BundleError("give --encrypt-key or --encrypt-passphrase, not both")
    return SealConfig(sign_key=sign_key, encrypt_key=encrypt_key, passphrase=_passphrase(confirm=True) if encrypt_passphrase else None)


@app.command("keygen")
@_handle_errors
def keygen_command(
    out: Path = typer.Option(..., "--out", help="Private key file; the public key goes to OUT.pub."),
    aes: bool = typer.Option(False, "--aes", help="Make a 32-byte AES-256 key for --encrypt-key instead of an Ed25519 signing key pair."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing key files."),
    json_output: bool = JSON,
) -> None:
    """Make an Ed25519 key pair for signing bundles (OUT, mode 0600, and OUT.pub), or an AES key with --aes."""
    from .bundle import fingerprint, keygen, load_private_key

    paths = keygen(out, "aes" if aes else "ed25519", force)
    document: dict[str, Any] = {"kind": "aes-256" if aes else "ed25519", "private": str(paths[0])}
    if not aes:
        document.update(public=str(paths[1]), fingerprint=fingerprint(load_private_key(paths[0]).public_key()))
    if json_output:
        _print_json(document)
    elif aes:
        stderr.print(f"AES-256 key → {paths[0]} (mode 0600); use: edgesnn build --encrypt-key {paths[0]}", highlight=False, soft_wrap=True)
    else:
        stderr.print(f"Ed25519 key {document['fingerprint']}: private → {paths[0]} (mode 0600), public → {paths[1]}; use: edgesnn build --sign-key {paths[0]}", highlight=False, soft_wrap=True)


@app.command("verify")
@_handle_errors
def verify_command(
    bundle: Path = typer.Argument(..., help="A bundle folder written by `edgesnn build`."),
    pubkey: Path = typer.Option(..., "--pubkey", help="The signer's public key (OUT.pub from `edgesnn keygen`)."),
    json_output: bool = JSON,
) -> None:
    """Check a bundle's signature and the sha256 of every file; name each file that changed, is missing or is extra.

    Exit 0 when everything matches, 1 otherwise.
    """
    from .bundle import verify
    from .errors import TamperedBundleError

    report = verify(bundle, pubkey)
    if json_output:
        _print_json(report.to_json())
        if not report.ok:
            raise typer.Exit(1)
        return
    if not report.ok:
        raise TamperedBundleError(report.summary())
    note = f"; {len(report.encrypted)} encrypted" if report.encrypted else ""
    stderr.print(f"ok: {report.summary()}{note}", highlight=False, soft_wrap=True)


@app.command("decrypt")
@_handle_errors
def decrypt_command(
    bundle: Path = typer.Argument(..., help="A bundle folder whose artifacts were encrypted by `edgesnn build`."),
    key: Optional[Path] = typer.Option(None, "--key", help="The 32-byte key file given to --encrypt-key."),
    passphrase: bool = typer.Option(False, "--passphrase", help=f"Use the passphrase given to --encrypt-passphrase (from ${PASSPHRASE_ENV}, else asked for)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write a decrypted copy of the bundle here instead of decrypting in place."),
    json_output: bool = JSON,
) -> None:
    """Restore the encrypted artifacts of a bundle, byte for byte (checked against the manifest's sha256)."""
    from .bundle import decrypt
    from .errors import BundleError

    if (key is None) == (not passphrase):
        raise BundleError("decrypt needs exactly one of --key FILE or --passphrase")
    restored = decrypt(bundle, key_file=key, passphrase=_passphrase(confirm=False) if passphrase else None, out=out)
    target = out if out is not None else bundle
    if json_output:
        _print_json({"bundle": str(target), "decrypted": restored})
    else:
        stderr.print(f"decrypted {len(restored)} files in {target}: {', '.join(restored)}", highlight=False, soft_wrap=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
