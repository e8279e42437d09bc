"""Benchmark: `edgesnn build --private --binary` on the zoo teachers, measured on the full Fashion-MNIST test set.

    .venv/bin/python bench/private_binary_fmnist.py [--budget standard] [--models fmnist_resnet8,fmnist_vgg] [--limit 10000] [--cifar] [--keep bench/builds [--resume]]
        [--vary synth_count=4096,final_steps=1200] [--synth iterations=128,min_iterations=64]

For each zoo model, one build with the chosen budget (the same stages and
configuration as the CLI), then on the test set: the teacher; the converted SNN
run at T=1 with no retraining; the private T=1 model; the private + binary T=1
model (overall and per true class); the share of 1-bit weights; model bytes against the fp32 teacher
(BatchNorm folded); weight cosine to the ANN per layer; seconds and peak RSS
per stage. With --cifar, also a CIFAR-sized ResNet-20 (3×32×32, random weights,
option-A shortcuts) for time and memory only. The build never reads the test
set: it is read afterwards, by this script. Prints a Markdown table for
BENCHMARKS.md and writes the raw figures to bench/results/private_binary_<budget>.json.
--vary changes some of the budget's iteration counts and --synth some SynthConfig
fields for a probe (the figures then go to private_binary_<budget>_varied.json);
the CLI's budgets stay as they are.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from edgesnn.binarize import binary_share, model_bytes
from edgesnn.convert import ConvertConfig
from edgesnn.datasets import load_labelled_images
from edgesnn.load import LoadConfig
from edgesnn.pipeline import BUDGETS, BuildConfig, build, teacher_bytes_fp32
from edgesnn.privatize import resolve_precision, snn_logits, weight_cosines
from edgesnn.synth import SynthConfig
from edgesnn.zoo import ZOO
from common import DATA, ROOT, known_names, parse_fields, require_data

PUBLISHED_ONE_STEP = 92.9  # one-timestep binary SNN trained on real data (the reference figure)


def build_config(model: str, budget: str, load: LoadConfig = LoadConfig(), seed: int = 0, vary: dict | None = None, synth: dict | None = None, precision: str = "auto") -> BuildConfig:
    """What `edgesnn build MODEL --private --binary --budget BUDGET --precision P` runs (with ``vary``: some of the
    budget's counts changed; with ``synth``: some SynthConfig fields)."""
    preset = dataclasses.replace(BUDGETS[budget], **(vary or {}))
    precision = resolve_precision(precision)
    privatize = preset.privatize_config(seed=seed, precision=precision)
    binarize = preset.binarize_config(seed=seed, precision=precision)
    return BuildConfig(
        model=model,
        load=load,
        synth=SynthConfig(**{"count": preset.synth_count, "seed": seed, **(synth or {})}),
        convert=ConvertConfig(timesteps=max(privatize.schedule), seed=seed),
        privatize=privatize,
        binarize=binarize,
        seed=seed,
    )


CLASSES = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")  # Fashion-MNIST labels 0-9


def correct(predictions: torch.Tensor, labels: torch.Tensor | int) -> float:
    """Share of predictions equal to their label."""
    return float((predictions == labels).float().mean())


def accuracy(model, images: torch.Tensor, labels: torch.Tensor, timesteps: int) -> float:
    return correct(snn_logits(model, images, timesteps).argmax(1), labels)


def per_class(predictions: torch.Tensor, labels: torch.Tensor) -> list[float | None]:
    """Accuracy on the test images of each true class, in label order, None for a class with no images under
    --limit (most of the binary model's gap is one class: BENCHMARKS.md, session 16)."""
    return [round(correct(predictions[labels == c], c), 4) if bool((labels == c).any()) else None for c in range(len(CLASSES))]


def run_model(name: str, budget: str, limit: int, seed: int, log, keep: Path | None = None, vary: dict | None = None, synth: dict | None = None, resume: bool = False, precision: str = "auto") -> dict:
    entry = ZOO[name]
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        # A kept build is rebuilt from scratch (force): the timings are the point. With --resume it is resumed instead:
        # a stage whose configuration and inputs are unchanged is loaded, and reports the seconds it took when it ran.
        result = build(build_config(name, budget, seed=seed, vary=vary, synth=synth, precision=precision), keep / name if keep else Path(folder) / "out", force=not resume, progress=lambda *a: None, log=log)
        build_seconds = round(time.perf_counter() - started, 1)
    if resume:  # the whole build's seconds: the resumed stages' recorded ones plus what ran now
        build_seconds = round(sum(stage["seconds"] for stage in result.stages.values()), 1)
    test = load_labelled_images(DATA, "test", entry.normalize, limit)
    images, labels = torch.from_numpy(test.images), torch.from_numpy(test.labels)
    teacher = result.teacher.network
    with torch.no_grad():
        teacher_predictions = torch.cat([teacher(images[i : i + 1000]) for i in range(0, len(images), 1000)]).argmax(1)
    teacher_accuracy = correct(teacher_predictions, labels)
    final = result.model
    converted = result.converted
    # The private model before binarization is the binarize stage's input: rebuild it from the stage record.
    private = result.private
    private_logits, binary_logits = (snn_logits(m, images, 1) for m in (private, final))
    private_predictions, binary_predictions = private_logits.argmax(1), binary_logits.argmax(1)
    calibrations = {"private": private.metrics["privatize"].get("output_bias", {}), "binary": final.metrics["binarize"].get("output_bias", {})}

    def uncalibrated(logits: torch.Tensor, calibration: dict) -> float:
        """Accuracy without the stage's output-bias offsets (the logits less what calibrate_output_bias added)."""
        offsets = torch.tensor(calibration["offsets"]) if calibration.get("calibrated") else torch.zeros(logits.shape[1])
        return correct((logits - offsets).argmax(1), labels)

    row = {
        "model": name,
        "budget": budget,
        "vary": vary or {},
        "synth_changes": synth or {},
        "build_seconds": build_seconds,
        "teacher_accuracy": teacher_accuracy,
        "converted_t1_accuracy": accuracy(converted, images, labels, 1),
        "converted_t4_accuracy": accuracy(converted, images, labels, converted.timesteps),
        "private_t1_accuracy": correct(private_predictions, labels),
        "binary_t1_accuracy": correct(binary_predictions, labels),
        "private_t1_accuracy_uncalibrated": uncalibrated(private_logits, calibrations["private"]),
        "binary_t1_accuracy_uncalibrated": uncalibrated(binary_logits, calibrations["binary"]),
        "output_bias": calibrations,
        "per_class_accuracy": {
            "classes": list(CLASSES),
            "teacher": per_class(teacher_predictions, labels),
            "private_t1": per_class(private_predictions, labels),
            "binary_t1": per_class(binary_predictions, labels),
        },
        "binary_fraction": round(binary_share(final), 5),
        "model_bytes": model_bytes(final),
        "private_model_bytes_fp32": model_bytes(private),
        "teacher_fp32_bytes": teacher_bytes_fp32(result.teacher),
        "weight_cosine_private": private.metrics["privatize"]["weight_cosine_after"],
        "weight_cosine_binary": weight_cosines(converted.graph, final),
        "layers": {n: {k: v for k, v in layer.items()} for n, layer in final.metrics["binarize"]["layers"].items()},
        "channels_back": final.metrics["binarize"].get("channels_back", []),
        "binarize_steps": final.metrics["binarize"]["steps"],
        "privatize_phases": private.metrics["privatize"]["phases"],
        "synth": {k: v for k, v in result.synthetic.metrics.items()},
        "stages": {k: {"seconds": v["seconds"], "peak_rss_mb": v["peak_rss_mb"]} for k, v in result.stages.items()},
        "resumed_stages": [k for k, v in result.stages.items() if v.get("resumed")],
    }
    row["size_ratio"] = round(row["teacher_fp32_bytes"] / row["model_bytes"], 2)
    log(
        f"{name}: teacher {100 * teacher_accuracy:.2f}, converted T=1 {100 * row['converted_t1_accuracy']:.2f}, private T=1 {100 * row['private_t1_accuracy']:.2f}, "
        f"private+binary T=1 {100 * row['binary_t1_accuracy']:.2f}, {100 * row['binary_fraction']:.1f}% 1-bit, {row['size_ratio']}× smaller, build {build_seconds} s"
    )
    return row


def run_cifar(budget: str, seed: int, log, vary: dict | None = None, synth: dict | None = None, precision: str = "auto") -> dict:
    """A CIFAR-sized ResNet-20 (random weights): time and peak RSS per stage only."""
    sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
    from resnet_lambda import resnet20  # noqa: E402

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "resnet20.pt"
        torch.save(resnet20().state_dict(), checkpoint)
        load = LoadConfig(arch=f"{ROOT / 'tests' / 'fixtures' / 'resnet_lambda.py'}:resnet20", input_shape=(3, 32, 32))
        started = time.perf_counter()
        result = build(build_config(str(checkpoint), budget, load, seed, vary, synth, precision), Path(folder) / "out", progress=lambda *a: None, log=log)
        seconds = round(time.perf_counter() - started, 1)
    row = {
        "model": "cifar_resnet20 (random weights)",
        "budget": budget,
        "vary": vary or {},
        "synth_changes": synth or {},
        "build_seconds": seconds,
        "binary_fraction": round(binary_share(result.model), 5),
        "size_ratio": round(teacher_bytes_fp32(result.teacher) / model_bytes(result.model), 2),
        "stages": {k: {"seconds": v["seconds"], "peak_rss_mb": v["peak_rss_mb"]} for k, v in result.stages.items()},
    }
    log(f"cifar_resnet20: build {seconds} s, stages {row['stages']}")
    return row


def markdown(rows: list[dict], cifar: dict | None, limit: int) -> str:
    lines = [
        f"| model | teacher | converted T=1 | private T=1 | private + binary T=1 | vs teacher | vs published {PUBLISHED_ONE_STEP} | 1-bit weights | bytes (teacher fp32) | size ratio | build s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {100 * r['teacher_accuracy']:.2f} | {100 * r['converted_t1_accuracy']:.2f} | {100 * r['private_t1_accuracy']:.2f} | "
            f"{100 * r['binary_t1_accuracy']:.2f} | {100 * (r['binary_t1_accuracy'] - r['teacher_accuracy']):+.2f} | {100 * r['binary_t1_accuracy'] - PUBLISHED_ONE_STEP:+.2f} | "
            f"{100 * r['binary_fraction']:.1f}% | {r['model_bytes']:,} ({r['teacher_fp32_bytes']:,}) | {r['size_ratio']}× | {r['build_seconds']} |"
        )
    stages = ["load", "synth", "convert", "privatize", "binarize", "export", "profile"]
    lines += ["", "| model | " + " | ".join(f"{s} s (peak RSS MiB)" for s in stages) + " |", "|---|" + "---|" * len(stages)]
    for r in rows + ([cifar] if cifar else []):
        lines.append(f"| {r['model']} | " + " | ".join(f"{r['stages'][s]['seconds']:.0f} ({r['stages'][s]['peak_rss_mb']:.0f})" if s in r["stages"] else "" for s in stages) + " |")
    lines += ["", "| model | layer | weights | format | agreement drop (pts) | weight error | cosine to ANN: private | binary |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for name, layer in r["layers"].items():
            drop, error = layer.get("agreement_drop"), layer.get("weight_error")
            lines.append(
                f"| {r['model']} | {name} | {layer['weights']} | {layer['weight_format']}{' (fixed)' if layer.get('fixed') else ''}{mixed_note(layer)} | "
                f"{'' if drop is None else drop} | {'' if error is None else error} | {r['weight_cosine_private'].get(name, '')} | {r['weight_cosine_binary'].get(name, '')} |"
            )
    lines += ["", "| model | accuracy per true class | " + " | ".join(CLASSES) + " |", "|---|---|" + "---|" * len(CLASSES)]
    for r in rows:
        for key, what in (("teacher", "teacher"), ("private_t1", "private T=1"), ("binary_t1", "private + binary T=1")):
            lines.append(f"| {r['model']} | {what} | " + " | ".join("" if a is None else f"{100 * a:.1f}" for a in r["per_class_accuracy"][key]) + " |")
    return "\n".join(lines)


def mixed_note(layer: dict) -> str:
    """" (27/160 channels 1-bit)" for a mixed layer, "" for any other."""
    return f" ({layer['binary_channels']}/{layer['channels']} channels 1-bit)" if "binary_channels" in layer else ""


def parse_vary(text: str, parser: argparse.ArgumentParser) -> dict[str, int]:
    """``KEY=VALUE,...`` of ``--vary`` as Budget fields; a usage error for an unknown field or a value that is not a positive integer."""
    fields = {field.name for field in dataclasses.fields(BUDGETS["standard"])}
    vary = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in fields or not value.isdigit() or int(value) <= 0:
            parser.error(f"--vary {item}: expected FIELD=N with N a positive integer and FIELD one of {', '.join(sorted(fields))}")
        vary[key] = int(value)
    return vary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(ZOO))
    parser.add_argument("--budget", default="standard", choices=list(BUDGETS))
    parser.add_argument("--limit", type=int, default=10000, help="test images evaluated")
    parser.add_argument("--cifar", action="store_true", help="also time a CIFAR-sized ResNet-20")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="keep each build folder as KEEP/<model> (bench/export_fmnist.py reads them)")
    parser.add_argument("--resume", action="store_true", help="with --keep: resume each kept build rather than rebuild it (a probe of a later stage; build seconds = the stages' recorded seconds)")
    parser.add_argument("--vary", default="", help="change some of the budget's counts, e.g. synth_count=4096,final_steps=1200 (a probe, not the CLI's budget)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="training arithmetic, as `edgesnn build --precision` (auto: bf16 on a CPU with avx512_bf16 or AMX)")
    parser.add_argument("--synth", default="", help="change SynthConfig fields of the build, e.g. iterations=128,min_iterations=64 (a probe)")
    args = parser.parse_args()
    require_data()
    vary = parse_vary(args.vary, parser)
    synth = parse_fields(args.synth, SynthConfig, "--synth", parser)
    if args.resume and args.keep is None:
        parser.error("--resume needs --keep (the folder of the builds to resume)")
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    rows = [run_model(name, args.budget, args.limit, args.seed, log, args.keep, vary, synth, args.resume, args.precision) for name in known_names(args.models, ZOO)]
    cifar = run_cifar(args.budget, args.seed, log, vary, synth, args.precision) if args.cifar else None
    precision = resolve_precision(args.precision)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, Python {platform.python_version()}, training precision {precision}"
    out = args.out or Path(__file__).parent / "results" / f"private_binary_{args.budget}{'_varied' if vary or synth else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine, "limit": args.limit, "results": rows, "cifar": cifar}, indent=2) + "\n")
    budget = args.budget + "".join(f", {key}={value}" for key, value in {**vary, **{f"synth.{k}": v for k, v in synth.items()}}.items())
    print(f"private_binary_fmnist ({budget}) — {time.strftime('%Y-%m-%d')}, {machine}, {args.limit} test images\n")
    print(markdown(rows, cifar, args.limit))


if __name__ == "__main__":
    main()
