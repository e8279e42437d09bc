"""Benchmark: what the binarize stage's agreement budget buys (a probe for issue 3).

    .venv/bin/python bench/binarize_budget_fmnist.py --builds bench/builds-s9 [--models fmnist_resnet8,fmnist_vgg]
        [--max-loss 3,6] [--no-views] [--train temperature=8,ce_weight=0] [--threads 1]

For each model, the private model of an earlier standard build (BUILDS/<model>/private.pt
and synthetic.npz, made by `bench/private_binary_fmnist.py --keep BUILDS`) is binarized
again with the standard budget's binarize configuration at each --max-loss, and scored on
the Fashion-MNIST test set at T=1. The private model and the synthetic images are the same
in every row of a model, so rows differ only in the binarize settings. --no-views scores
the held-out images once each instead of in six views (BinarizeConfig.holdout_views).
--train changes fields of the binarize stage's TrainConfig in every row (e.g. feature_weight=0.3),
to compare ways of fine-tuning the same private model.

Prints a Markdown table and writes bench/results/binarize_budget_fmnist.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from edgesnn.binarize import binarize, model_bytes
from edgesnn.datasets import load_labelled_images
from edgesnn.pipeline import BUDGETS, load_teacher, read_spiking, read_synthetic
from edgesnn.privatize import snn_logits
from edgesnn.zoo import ZOO

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: bench/ is on the path; imported: make it so
from common import DATA, ROOT, known_names, parse_train, require_data  # noqa: E402


def run(name: str, max_loss: float, views: bool, args, log) -> dict:
    teacher = load_teacher(name)
    private = read_spiking(args.builds / name / "private.pt")
    synthetic = read_synthetic(args.builds / name / "synthetic.npz")
    config = BUDGETS["standard"].binarize_config(max_loss=max_loss, seed=args.seed)
    config = dataclasses.replace(config, holdout_views=views, train=dataclasses.replace(config.train, **args.train))
    started = time.perf_counter()
    model = binarize(private, teacher, synthetic, config)
    seconds = time.perf_counter() - started
    test = load_labelled_images(DATA, "test", ZOO[name].normalize, args.limit)
    predictions = snn_logits(model, torch.from_numpy(test.images), 1).argmax(1)
    metrics = model.metrics["binarize"]
    row = {
        "model": name,
        "max_loss": max_loss,
        "holdout_views": views,
        "train": args.train,
        "binary_t1_accuracy": round(float((predictions == torch.from_numpy(test.labels)).float().mean()), 4),
        "binary_fraction": metrics["binary_fraction"],
        "model_bytes": model_bytes(model),
        "agreement_int8": metrics["agreement_int8"],
        "agreement_final": metrics["agreement_final"],
        "steps": metrics["steps"],
        "binarize_seconds": round(seconds, 1),
    }
    binary = [step["layer"] for step in metrics["steps"] if step["accepted"]]
    changes = "".join(f" {key}={value}" for key, value in args.train.items())
    log(f"{name} max-loss {max_loss} views {views}{changes}: binary T=1 {100 * row['binary_t1_accuracy']:.2f}%, {100 * row['binary_fraction']:.1f}% 1-bit ({', '.join(binary) or 'none'})")
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| model | --max-loss | held-out views | private + binary T=1 | 1-bit weights | bytes | binary layers | binarize s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        binary = ", ".join(step["layer"] for step in r["steps"] if step["accepted"]) or "none"
        lines.append(
            f"| {r['model']} | {r['max_loss']:g} | {6 if r['holdout_views'] else 1} | {100 * r['binary_t1_accuracy']:.2f} | {100 * r['binary_fraction']:.1f}% | "
            f"{r['model_bytes']:,} | {binary} | {r['binarize_seconds']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(ZOO))
    parser.add_argument("--builds", type=Path, default=ROOT / "bench" / "builds", help="earlier standard builds (BUILDS/<model>/private.pt, synthetic.npz)")
    parser.add_argument("--max-loss", default="3,6", help="comma-separated --max-loss values, agreement points")
    parser.add_argument("--no-views", action="store_true", help="score each held-out image once (not in six views)")
    parser.add_argument("--limit", type=int, default=10000, help="test images evaluated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train", default="", help="change TrainConfig fields of the binarize stage, e.g. temperature=8,ce_weight=0")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "binarize_budget_fmnist.json")
    args = parser.parse_args()
    args.train = parse_train(args.train, parser)
    models = known_names(args.models, ZOO)
    try:
        budgets = [float(value) for value in args.max_loss.split(",") if value]
    except ValueError:
        sys.exit(f"error: --max-loss {args.max_loss!r}: expected comma-separated numbers")
    require_data()
    missing = [str(args.builds / m / f) for m in models for f in ("private.pt", "synthetic.npz") if not (args.builds / m / f).is_file()]
    if missing:
        sys.exit(f"error: {', '.join(missing)} not found; run bench/private_binary_fmnist.py --keep {args.builds} first")
    torch.set_num_threads(args.threads)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    rows = [run(name, max_loss, not args.no_views, args, log) for name in models for max_loss in budgets]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": args.threads, "train": args.train, "builds": str(args.builds), "rows": rows}, indent=2) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
