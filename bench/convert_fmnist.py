"""Benchmark: data-free conversion of the zoo teachers, measured on the full Fashion-MNIST test set.

    .venv/bin/python bench/convert_fmnist.py [--models fmnist_resnet8,fmnist_vgg] [--count 5000] [--limit 10000]

For each zoo model: teacher accuracy; synthesis of --count images (seconds,
images/s, teacher agreement, BN error, diversity); conversion calibrated (a) on
those synthetic images and (b) on the same number of real training images;
SNN accuracy at T = 1, 2, 4, 8, 16, 32, 64 for both; conversion seconds; peak
RSS. Needs `apt-get install dataset-fashion-mnist`. Prints a Markdown table
for BENCHMARKS.md and writes the raw figures to bench/results/convert_fmnist.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edgesnn.artifacts import SyntheticSet
from edgesnn.convert import ConvertConfig, convert
from edgesnn.datasets import load_labelled_images
from edgesnn.evaluate import evaluate
from edgesnn.pipeline import load_teacher, peak_rss_mb
from edgesnn.synth import SynthConfig, synthesize
from edgesnn.zoo import ZOO

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: bench/ is on the path; imported: make it so
from common import DATA, known_names, require_data  # noqa: E402

TIMESTEPS = [1, 2, 4, 8, 16, 32, 64]


def run_model(name: str, count: int, limit: int, seed: int, log) -> dict:
    entry = ZOO[name]
    teacher = load_teacher(name)
    test = load_labelled_images(DATA, "test", entry.normalize, limit)
    train = load_labelled_images(DATA, "train", entry.normalize)
    result: dict = {"model": name}

    started = time.perf_counter()
    synthetic = synthesize(teacher, SynthConfig(count=count, seed=seed), lambda task, done, total: None)
    result["synth_seconds"] = round(time.perf_counter() - started, 1)
    result["synth"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in synthetic.metrics.items()}
    log(f"{name}: {count} synthetic images in {result['synth_seconds']} s, teacher agrees on {synthetic.metrics['target_agreement']:.3f}")

    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(train.labels), generator=generator)[:count]
    real_images = torch.from_numpy(train.images)[pick]
    real = SyntheticSet(real_images, torch.from_numpy(train.labels)[pick], torch.zeros(count, teacher.num_classes), "real-train", {})

    for calibration, images in (("synthetic", synthetic), ("real", real)):
        started = time.perf_counter()
        model = convert(teacher, images, ConvertConfig(seed=seed))
        convert_seconds = round(time.perf_counter() - started, 2)
        report = evaluate(teacher, model, test, TIMESTEPS)
        result["teacher_accuracy"] = report.ann_accuracy
        result[calibration] = {
            "convert_seconds": convert_seconds,
            "snn_accuracy": {str(t): round(a, 4) for t, a in report.snn_accuracy.items()},
            "eval_seconds": report.seconds,
        }
        log(f"{name} calibrated on {calibration}: " + ", ".join(f"T={t} {a:.4f}" for t, a in report.snn_accuracy.items()) + f" (teacher {report.ann_accuracy:.4f})")
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def markdown(results: list[dict], count: int, limit: int) -> str:
    header = "| model | teacher | calibration | " + " | ".join(f"T={t}" for t in TIMESTEPS) + " |"
    lines = [header, "|" + "---|" * (3 + len(TIMESTEPS))]
    for r in results:
        for calibration in ("synthetic", "real"):
            accs = " | ".join(f"{100 * r[calibration]['snn_accuracy'][str(t)]:.2f}" for t in TIMESTEPS)
            lines.append(f"| {r['model']} | {100 * r['teacher_accuracy']:.2f} | {calibration} ({count}) | {accs} |")
    lines += ["", "| model | synth s | images/s | teacher agrees | BN error | diversity | convert s (synthetic) | peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["synth"]
        lines.append(
            f"| {r['model']} | {r['synth_seconds']} | {s.get('images_per_second', float('nan')):.1f} | {100 * s['target_agreement']:.2f}% | "
            f"{s.get('bn_error', float('nan')):.3f} | {s.get('diversity', float('nan')):.3f} | {r['synthetic']['convert_seconds']} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(ZOO))
    parser.add_argument("--count", type=int, default=5000, help="synthetic (and real calibration) images")
    parser.add_argument("--limit", type=int, default=10000, help="test images evaluated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "convert_fmnist.json")
    args = parser.parse_args()
    require_data()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    results = [run_model(name, args.count, args.limit, args.seed, log) for name in known_names(args.models, ZOO)]
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, Python {platform.python_version()}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine, "count": args.count, "limit": args.limit, "results": results}, indent=2) + "\n")
    print(f"convert_fmnist — {time.strftime('%Y-%m-%d')}, {machine}, {args.limit} test images\n")
    print(markdown(results, args.count, args.limit))


if __name__ == "__main__":
    main()
