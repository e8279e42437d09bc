"""Benchmark: edgesnn's synthesis beside the published DeepInversion CIFAR recipe, on the zoo teachers.

    .venv/bin/python bench/synth_recipe_fmnist.py [--models fmnist_resnet8,fmnist_vgg] [--count 1024] [--limit 10000] [--out FILE] [--smoke]

For each zoo teacher, two synthetic sets of ``--count`` images each:

- "edgesnn": ``SynthConfig(count=N, seed=0)``, the defaults (pool of 128,
  at most 64 Adam steps per image with early stop, lr 0.2 cosine, low-res warm start);
- "published": the DeepInversion CIFAR-10 setting (batch 256, 2,000 Adam
  iterations, lr 0.05, BN weight 10, TV 2.5e-5, ±2 px jitter), expressed in
  SynthConfig: no early stop, no warm start, no L2 prior, first-BN multiplier 1.

Per set: seconds, seconds per image, teacher agreement, BN error, diversity,
process peak RSS. Then, on the real test set (the synthesis never reads it):
the SNN converted on the set (T=32 calibration) at T=1, 4, 32, and the
private (T=1) and private + binary models trained on the set with the "fast"
budget, configured as ``edgesnn build --private --binary --budget fast``
(bench/private_binary_fmnist.py's build_config). Prints a Markdown table and
writes the figures to ``--out``; a model already in ``--out`` from an earlier
run is replaced, others are kept, so the models can be run one at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from private_binary_fmnist import DATA, accuracy, build_config  # noqa: E402

from edgesnn.binarize import binarize, binary_share  # noqa: E402
from edgesnn.convert import ConvertConfig, convert  # noqa: E402
from edgesnn.datasets import load_labelled_images  # noqa: E402
from edgesnn.pipeline import load_teacher  # noqa: E402
from edgesnn.privatize import privatize, teacher_logits  # noqa: E402
from edgesnn.synth import SynthConfig, synthesize  # noqa: E402
from edgesnn.zoo import ZOO  # noqa: E402
from common import known_names, require_data  # noqa: E402

BUDGET = "fast"
CONVERT_TIMESTEPS = (1, 4, 32)


def recipes(count: int, seed: int, smoke: bool) -> dict[str, SynthConfig]:
    """The two synthesis settings, same image count and seed."""
    iterations = 40 if smoke else 2000  # --smoke: a timing probe, not the recipe
    published = SynthConfig(
        count=count,
        method="deepinversion",
        batch_size=256,
        iterations=iterations,
        min_iterations=iterations,  # no early stop: every image gets all iterations
        lr=0.05,
        seed=seed,
        bn_weightings=((10.0, 1.0),),  # weight 10; the CIFAR script weights every BN layer alike (the ImageNet one uses 10 on the first)
        tv_weight=2.5e-5,
        l2_weight=0.0,
        jitter=2,
        flip=True,
        warm_start_scale=1,  # no low-resolution warm start
    )
    return {"edgesnn": SynthConfig(count=count, seed=seed), "published": published}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def downstream(name: str, teacher, synthetic, images: torch.Tensor, labels: torch.Tensor, seed: int, smoke: bool, log) -> dict:
    """Conversion and fast-budget private/binary training on one synthetic set, measured on the test set."""
    config = build_config(name, BUDGET, seed=seed)
    privatize_config, binarize_config = config.privatize, config.binarize
    if smoke:
        privatize_config = dataclasses.replace(privatize_config, temporal_steps=2, final_steps=4)
        binarize_config = dataclasses.replace(binarize_config, step_steps=2, final_steps=2)
    row: dict = {}
    started = time.perf_counter()
    converted = convert(teacher, synthetic, ConvertConfig(timesteps=32, seed=seed))
    row["convert_seconds"] = round(time.perf_counter() - started, 1)
    for steps in CONVERT_TIMESTEPS:
        row[f"converted_t{steps}_accuracy"] = accuracy(converted, images, labels, steps)
    # What the build feeds privatize: the SNN converted with bias correction for the first training T.
    started = time.perf_counter()
    model = convert(teacher, synthetic, config.convert)
    private = privatize(model, teacher, synthetic, privatize_config)
    row["privatize_seconds"] = round(time.perf_counter() - started, 1)
    row["private_t1_accuracy"] = accuracy(private, images, labels, 1)
    started = time.perf_counter()
    binary = binarize(private, teacher, synthetic, binarize_config)
    row["binarize_seconds"] = round(time.perf_counter() - started, 1)
    row["binary_t1_accuracy"] = accuracy(binary, images, labels, 1)
    row["binary_fraction"] = round(binary_share(binary), 5)
    row["peak_rss_mb"] = peak_rss_mb()
    log(
        f"  converted T=1/4/32 {100 * row['converted_t1_accuracy']:.2f}/{100 * row['converted_t4_accuracy']:.2f}/{100 * row['converted_t32_accuracy']:.2f}, "
        f"private T=1 {100 * row['private_t1_accuracy']:.2f}, binary T=1 {100 * row['binary_t1_accuracy']:.2f} ({100 * row['binary_fraction']:.1f}% 1-bit)"
    )
    return row


def run_model(name: str, count: int, limit: int, seed: int, smoke: bool, log) -> dict:
    teacher = load_teacher(name)
    test = load_labelled_images(DATA, "test", ZOO[name].normalize, limit)
    images, labels = torch.from_numpy(test.images), torch.from_numpy(test.labels)
    teacher_accuracy = float((teacher_logits(teacher, images).argmax(1) == labels).float().mean())
    log(f"{name}: teacher {100 * teacher_accuracy:.2f} on {len(labels)} test images")
    row = {"model": name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "count": count, "torch_threads": torch.get_num_threads(), "teacher_accuracy": teacher_accuracy, "recipes": {}}
    for recipe, synth_config in recipes(count, seed, smoke).items():
        log(f"{name} / {recipe}: synthesising {count} images")
        load_before = os.getloadavg()[0]
        synthetic = synthesize(teacher, synth_config)
        metrics = synthetic.metrics
        entry = {
            "config": dataclasses.asdict(synth_config),
            "seconds": round(metrics["seconds"], 1),
            "seconds_per_image": round(metrics["seconds"] / count, 4),
            "target_agreement": metrics["target_agreement"],
            "bn_error": metrics.get("bn_error"),
            "diversity": metrics["diversity"],
            "iterations_mean": metrics["iterations_mean"],
            "synth_peak_rss_mb": peak_rss_mb(),
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after: above the thread count means shared cores
        }
        log(f"  {entry['seconds']} s ({entry['seconds_per_image']} s/image), agreement {100 * entry['target_agreement']:.2f}, BN error {entry['bn_error']:.4f}")
        entry.update(downstream(name, teacher, synthetic, images, labels, seed, smoke, log))
        row["recipes"][recipe] = entry
    row["seconds_per_image_ratio"] = round(row["recipes"]["published"]["seconds_per_image"] / row["recipes"]["edgesnn"]["seconds_per_image"], 1)
    return row


def retime(name: str, count: int, probe: int, passes: int, seed: int, log) -> dict:
    """Synthesis seconds per image again, fastest of ``passes``: edgesnn's whole set, the published recipe from a probe.

    With no early stop every published iteration costs the same, so one batch
    of 256 run for ``probe`` iterations, scaled by 2000 / probe, is the cost of
    a batch (the scaling also scales the one-off quality measurement, a few
    hundredths of a second). For timings taken while other work shares the cores.
    """
    teacher = load_teacher(name)
    configs = recipes(count, seed, smoke=False)
    published = dataclasses.replace(configs["published"], count=256, iterations=probe, min_iterations=probe)
    timings: dict[str, list[float]] = {"edgesnn": [], "published": []}
    loads = []
    for _ in range(passes):
        loads.append(round(os.getloadavg()[0], 2))
        timings["edgesnn"].append(synthesize(teacher, configs["edgesnn"]).metrics["seconds"] / count)
        timings["published"].append(synthesize(teacher, published).metrics["seconds"] * (configs["published"].iterations / probe) / 256)
        loads.append(round(os.getloadavg()[0], 2))
        log(f"{name}: edgesnn {timings['edgesnn'][-1]:.4f} s/image, published {timings['published'][-1]:.4f} s/image (probe {probe} iterations), load {loads[-2:]}")
    best = {recipe: round(min(values), 4) for recipe, values in timings.items()}
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "probe_iterations": probe,
        "passes": passes,
        "edgesnn_seconds_per_image": best["edgesnn"],
        "published_seconds_per_image": best["published"],
        "seconds_per_image_ratio": round(best["published"] / best["edgesnn"], 1),
        "all_passes": {recipe: [round(v, 4) for v in values] for recipe, values in timings.items()},
        "load_average_1min": loads,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | teacher (test) | recipe | images | synth s | s/image | iterations/image | teacher agreement | BN error | diversity | converted T=1 | T=4 | T=32 | private T=1 | private + binary T=1 | 1-bit weights |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for recipe, r in row.get("recipes", {}).items():
            lines.append(
                f"| {row['model']} | {100 * row['teacher_accuracy']:.2f} | {recipe} | {row['count']} | {r['seconds']:.0f} | {r['seconds_per_image']:.3f} | {r['iterations_mean']:.0f} | {100 * r['target_agreement']:.2f} | "
                f"{r['bn_error']:.4f} | {r['diversity']:.3f} | {100 * r['converted_t1_accuracy']:.2f} | {100 * r['converted_t4_accuracy']:.2f} | {100 * r['converted_t32_accuracy']:.2f} | "
                f"{100 * r['private_t1_accuracy']:.2f} | {100 * r['binary_t1_accuracy']:.2f} | {100 * r['binary_fraction']:.1f}% |"
            )
    lines += ["", "| model | published s/image ÷ edgesnn s/image (full run) | retimed: edgesnn s/image | published s/image | ratio |", "|---|---|---|---|---|"]
    for row in rows:
        again = row.get("retime")
        retimed = f"{again['edgesnn_seconds_per_image']:.4f} | {again['published_seconds_per_image']:.4f} | {again['seconds_per_image_ratio']}×" if again else " | | "
        lines.append(f"| {row['model']} | {str(row['seconds_per_image_ratio']) + '×' if 'seconds_per_image_ratio' in row else 'not run'} | {retimed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(ZOO))
    parser.add_argument("--count", type=int, default=1024, help="images per recipe (a multiple of 256: whole published batches)")
    parser.add_argument("--limit", type=int, default=10000, help="test images evaluated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "synth_recipe_fmnist.json")
    parser.add_argument("--retime", action="store_true", help="only re-measure synthesis seconds per image of the models already in --out (fastest of --passes; published from a --probe-iteration batch)")
    parser.add_argument("--probe", type=int, default=100, help="--retime: published iterations timed (scaled to 2000)")
    parser.add_argument("--passes", type=int, default=2, help="--retime: timed passes per recipe")
    parser.add_argument("--smoke", action="store_true", help="1-minute self-check: 256 images, 40 published iterations, tiny training, 500 test images, first model only; writes nothing unless --out is given")
    args = parser.parse_args()
    require_data()
    torch.set_num_threads(args.threads)
    models = known_names(args.models, ZOO)
    if args.smoke:
        args.count, args.limit, models = 256, min(args.limit, 500), models[:1]
        if "--out" not in sys.argv:
            args.out = None
    if args.count <= 0 or args.count % 256:
        sys.exit(f"error: --count {args.count}: expected a positive multiple of 256")
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    if args.retime:
        document = json.loads(args.out.read_text())
        for name in models:
            row = next((r for r in document["results"] if r["model"] == name), None)
            if row is None:  # timing only: no image sets, no downstream figures
                row = {"model": name, "count": args.count, "torch_threads": torch.get_num_threads()}
                document["results"].append(row)
            row["retime"] = retime(name, row["count"], args.probe, args.passes, args.seed, log)
            args.out.write_text(json.dumps(document, indent=2) + "\n")
        print(markdown(document["results"]))
        return
    rows = []
    for name in models:
        rows.append(run_model(name, args.count, args.limit, args.seed, args.smoke, log))
        machine = {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
        }
        if args.out is not None:
            # Written after every model, so a run cut short keeps what finished.
            previous = json.loads(args.out.read_text())["results"] if args.out.exists() else []
            kept = [r for r in previous if r["model"] not in {row["model"] for row in rows}]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            results = kept + rows
            args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine, "limit": args.limit, "smoke": args.smoke, "results": results}, indent=2) + "\n")
    print(f"synth_recipe_fmnist — {time.strftime('%Y-%m-%d')}, {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, {args.limit} test images\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
