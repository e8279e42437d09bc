"""Benchmark: the hardware profile of the zoo models, and the wall time of a 100-trial crossbar Monte Carlo.

    .venv/bin/python bench/profile_fmnist.py [--builds bench/builds] [--images 1000] [--trials 100] [--models fmnist_resnet8,fmnist_vgg] [--monte-carlo-only]

For each model with a build folder (``bench/private_binary_fmnist.py --keep``):
the ANN (teacher.pt, BatchNorm folded) against the converted SNN (snn.pt, run
at T=32, the conversion's usual T) and against the private binary T=1 model
(binary.pt), counted on the first ``--images`` Fashion-MNIST test images: MACs,
ACs, spike rates, weight and activation bytes, energy and latency per built-in
target and ``energy_ratio``. Then a ``--trials``-trial Monte Carlo of the binary
model on crossbars (128×128 tiles) on the same images, timed: device variation
alone, and every non-ideality at once. Writes bench/results/profile_fmnist.json
and prints Markdown tables for BENCHMARKS.md. ``--monte-carlo-only`` times the Monte
Carlo alone and replaces only its figures in an existing results file.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from edgesnn.crossbar import CrossbarConfig, monte_carlo
from edgesnn.datasets import load_labelled_images
from edgesnn.pipeline import read_spiking, read_teacher
from edgesnn.profile import ProfileConfig, profile
from edgesnn.zoo import FASHION_MNIST_NORMALIZE

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: bench/ is on the path; imported: make it so
from common import DATA, ROOT  # noqa: E402

CONVERTED_T = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=Path, default=ROOT / "bench" / "builds")
    parser.add_argument("--models", default="fmnist_resnet8,fmnist_vgg")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "profile_fmnist.json")
    parser.add_argument("--monte-carlo-only", action="store_true", help="skip the profiles; update the Monte Carlo figures in --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_labelled_images(DATA, "test", FASHION_MNIST_NORMALIZE, args.images)
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    machine = {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.monte_carlo_only:
        results = json.loads(args.out.read_text())
        results["monte_carlo_machine"] = machine
    else:
        results = {"machine": machine, "images": len(images), "trials": args.trials, "models": {}}
    for name in args.models.split(","):
        folder = args.builds / name
        teacher = read_teacher(folder / "teacher.pt")
        entry: dict = results["models"][name] if args.monte_carlo_only else {}
        for label, file, steps in () if args.monte_carlo_only else (("converted", "snn.pt", CONVERTED_T), ("binary", "binary.pt", 1)):
            model = read_spiking(folder / file)
            started = time.perf_counter()
            document = profile(model, teacher, images, labels, ProfileConfig(timesteps=steps), DATA).document
            entry[label] = {
                "file": file,
                "timesteps": steps,
                "seconds": round(time.perf_counter() - started, 2),
                "ann_macs": document["ann"]["macs"],
                "snn_macs": document["snn"]["macs"],
                "snn_acs": round(document["snn"]["acs"]),
                "spike_rate": document["snn"]["spike_rate"],
                "ann_weight_bytes": document["ann"]["weight_bytes"],
                "snn_weight_bytes": document["snn"]["weight_bytes"],
                "ann_peak_bytes": document["ann"]["memory"]["peak_bytes"],
                "snn_peak_bytes": document["snn"]["memory"]["peak_bytes"],
                "snn_state_bytes": document["snn"]["memory"]["state_bytes"],
                "targets": {
                    target: {key: value[key] for key in ("ann_energy_uj", "ann_int8_energy_uj", "snn_energy_uj", "energy_ratio", "energy_ratio_int8", "compute_energy_ratio", "ann_latency_ms", "snn_latency_ms")}
                    for target, value in document["targets"].items()
                },
                "spike_rates": {n["name"]: n["spike_rate"] for n in document["snn"]["neuron_layers"]},
            }
            print(f"{name} {label}: profiled in {entry[label]['seconds']} s", flush=True)
        binary = read_spiking(folder / "binary.pt")
        monte = {}
        for label, config in (
            ("variation 0.1", CrossbarConfig(variation=0.1, trials=args.trials)),
            ("all non-idealities", CrossbarConfig(variation=0.1, faults=0.01, read_noise=0.02, adc_bits=6, ir_drop=0.05, trials=args.trials)),
        ):
            started = time.perf_counter()
            summary = monte_carlo(binary, images, labels, config).summary()
            summary["wall_seconds"] = round(time.perf_counter() - started, 2)
            monte[label] = summary
            print(f"{name} MC {label}: {summary['wall_seconds']} s, accuracy {summary['accuracy']['mean']:.4f} (ideal {summary['ideal_accuracy']:.4f})", flush=True)
        entry["monte_carlo"] = monte
        results["models"][name] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    if args.monte_carlo_only:
        print_monte_carlo(results)
        return
    print("| model | SNN | T | ANN MACs | SNN MACs + ACs | spike rate | weights ANN → SNN | " + " | ".join(f"{t} ratio" for t in ("asic45nm", "cortex_m4", "crossbar")) + " |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, entry in results["models"].items():
        for label in ("converted", "binary"):
            row = entry[label]
            ratios = " | ".join(f"{row['targets'][t]['energy_ratio']:.2f}× ({row['targets'][t]['energy_ratio_int8']:.2f}× vs int8)" for t in ("asic45nm", "cortex_m4", "crossbar"))
            print(f"| {name} | {label} | {row['timesteps']} | {row['ann_macs']:,} | {row['snn_macs']:,} + {row['snn_acs']:,} | {row['spike_rate']:.4f} | {row['ann_weight_bytes']:,} → {row['snn_weight_bytes']:,} B | {ratios} |")
    print_monte_carlo(results)


def print_monte_carlo(results: dict) -> None:
    print()
    print("| model | Monte Carlo | trials × images | seconds | ideal accuracy | mean accuracy | 95% CI |")
    print("|---|---|---|---|---|---|---|")
    for name, entry in results["models"].items():
        for label, summary in entry["monte_carlo"].items():
            print(f"| {name} | {label} | {summary['trials']} × {summary['images']} | {summary['wall_seconds']} | {summary['ideal_accuracy']:.4f} | {summary['accuracy']['mean']:.4f} | {summary['accuracy']['ci95'][0]:.4f}–{summary['accuracy']['ci95'][1]:.4f} |")


if __name__ == "__main__":
    main()
