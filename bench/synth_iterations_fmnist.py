"""Benchmark: does longer DeepInversion with a stronger BN term pay off downstream?

    .venv/bin/python bench/synth_iterations_fmnist.py [--models fmnist_resnet8] [--count 1024]
        [--iterations 256 --min-iterations 192 --bn-weight 10 --first-bn-multiplier 1]

For each model, two synthetic sets of --count images from the same seed: the
SynthConfig default of session 7 (BN weight 1, ×10 on the first BN layer; the default
has since become BN weight 10 with every layer alike), and that with more iterations per image and the BN
statistics term weighted like the published recipe (the settings above). Each set
then goes through the same conversion and fast-budget private/binary training as
bench/synth_recipe_fmnist.py (its ``downstream``), measured on the Fashion-MNIST
test set. A probe between edgesnn's default (about 33 iterations per image, BN
error ~0.14) and the published recipe (2,000 iterations, 65× the seconds per image).
Results: bench/results/synth_iterations_fmnist.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_recipe_fmnist import DATA, downstream  # noqa: E402

from edgesnn.datasets import load_labelled_images  # noqa: E402
from edgesnn.pipeline import load_teacher  # noqa: E402
from edgesnn.synth import SynthConfig, synthesize  # noqa: E402
from edgesnn.zoo import ZOO  # noqa: E402
from common import known_names, require_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="fmnist_resnet8")
    parser.add_argument("--count", type=int, default=1024)
    parser.add_argument("--iterations", type=int, default=256)
    parser.add_argument("--min-iterations", type=int, default=192)
    parser.add_argument("--bn-weight", type=float, default=10.0)
    parser.add_argument("--first-bn-multiplier", type=float, default=1.0)
    parser.add_argument("--limit", type=int, default=10000, help="test images evaluated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "synth_iterations_fmnist.json")
    args = parser.parse_args()
    require_data()
    models = known_names(args.models, ZOO)
    torch.set_num_threads(args.threads)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    default = SynthConfig(count=args.count, seed=args.seed, bn_weightings=((1.0, 10.0),))  # the default when this probe ran
    longer = dataclasses.replace(default, iterations=args.iterations, min_iterations=args.min_iterations, bn_weightings=((args.bn_weight, args.first_bn_multiplier),))
    results = []
    for name in models:
        teacher = load_teacher(name)
        test = load_labelled_images(DATA, "test", ZOO[name].normalize, args.limit)
        images, labels = torch.from_numpy(test.images), torch.from_numpy(test.labels)
        row = {"model": name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "count": args.count, "settings": {}}
        for label, config in (("default", default), ("longer", longer)):
            synthetic = synthesize(teacher, config)
            metrics = synthetic.metrics
            entry = {
                "config": dataclasses.asdict(config),
                "synth_seconds": round(metrics["seconds"], 1),
                "iterations_mean": round(metrics["iterations_mean"], 1),
                "target_agreement": metrics["target_agreement"],
                "bn_error": metrics.get("bn_error"),
                "diversity": metrics["diversity"],
            }
            log(f"{name} / {label}: {entry['synth_seconds']} s, {entry['iterations_mean']} iterations/image, BN error {entry['bn_error']:.4f}")
            entry.update(downstream(name, teacher, synthetic, images, labels, args.seed, False, log))
            row["settings"][label] = entry
        results.append(row)
        args.out.write_text(json.dumps({"threads": args.threads, "limit": args.limit, "results": results}, indent=2) + "\n")
    print("| model | setting | synth s | iterations/image | BN error | converted T=1 | private T=1 | private + binary T=1 | 1-bit weights |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in results:
        for label, r in row["settings"].items():
            print(
                f"| {row['model']} | {label} | {r['synth_seconds']:.0f} | {r['iterations_mean']:.0f} | {r['bn_error']:.4f} | {100 * r['converted_t1_accuracy']:.2f} | "
                f"{100 * r['private_t1_accuracy']:.2f} | {100 * r['binary_t1_accuracy']:.2f} | {100 * r['binary_fraction']:.1f}% |"
            )


if __name__ == "__main__":
    main()
