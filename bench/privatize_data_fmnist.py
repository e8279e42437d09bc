"""Benchmark: which training images make the best one-timestep student? (a probe for the private stage)

    .venv/bin/python bench/privatize_data_fmnist.py [--models fmnist_resnet8,fmnist_vgg] [--builds bench/builds]
        [--settings default,boundary,session7,bn3,bn10,bn10-long,tv0.1,tv0.3,build,real] [--count 2048] [--final-steps 600] [--threads 1]
        [--train norm=true,lr=0.003] [--schedule 4,2|none] [--temporal-steps 60]

For each model, the converted SNN of an earlier standard build (BUILDS/<model>/snn.pt,
made by `bench/private_binary_fmnist.py --keep BUILDS`) is retrained with the
standard budget's privatize configuration on --count training images from each
setting, and the private T=1 model is scored on the Fashion-MNIST test set. The
conversion is the same in every row, so the rows differ only in the images:

- default: DeepInversion with the SynthConfig defaults of now;
- boundary: the defaults with half the images aimed at two-class soft targets (SynthConfig.boundary_share 0.5);
- session7: DeepInversion with the SynthConfig default of session 7 (BN weight 1, ×10 on the first BN layer);
- bn3: BN weight 3, ×3 on the first layer;
- bn10: BN weight 10, every layer alike (the published CIFAR-10 weighting);
- mix: half the images with the session7 weighting, half with bn10 (two runs, seeds seed and seed+1;
  the SynthConfig default since session 9 does the same in one run);
- bn10-long: bn10 with 256 iterations per image (at least 192);
- tv0.1, tv0.3: the defaults with the total variation prior 10× and 30× stronger (smoother images);
- build: the build's own synthetic images (BUILDS/<model>/synthetic.npz; --count does not apply), so
  that with the default --train the row repeats the build's private stage (same seed and threads:
  the same model), and --train seed=N measures how far builds differ by their training seed alone;
- real: the first --count REAL training images with the teacher's labels. Not data-free:
  it is the ceiling that the synthetic rows are measured against, never a build option.

--train changes fields of the privatize TrainConfig in every row (e.g. norm=true), to
compare ways of training on the same images; --schedule and --temporal-steps change the
temporal phases before the T=1 one (--schedule none: T=1 from the start).

Prints a Markdown table and writes bench/results/privatize_data_fmnist.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from edgesnn.artifacts import SyntheticSet
from edgesnn.datasets import load_labelled_images
from edgesnn.pipeline import BUDGETS, load_teacher, read_spiking, read_synthetic
from edgesnn.privatize import privatize, snn_logits, teacher_logits
from edgesnn.synth import SynthConfig, synthesize
from edgesnn.zoo import ZOO

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: bench/ is on the path; imported: make it so
from common import DATA, ROOT, known_names, parse_train, require_data  # noqa: E402

SETTINGS = {
    "default": {},
    "boundary": {"boundary_share": 0.5},
    "session7": {"bn_weightings": ((1.0, 10.0),)},
    "bn3": {"bn_weightings": ((3.0, 3.0),)},
    "bn10": {"bn_weightings": ((10.0, 1.0),)},
    "bn10-long": {"bn_weightings": ((10.0, 1.0),), "iterations": 256, "min_iterations": 192},
    "tv0.1": {"tv_weight": 0.1},
    "tv0.3": {"tv_weight": 0.3},
    "mix": ("session7", "bn10"),
    "build": "build",
    "real": None,
}


def training_images(name: str, setting: str, teacher, count: int, seed: int, builds: Path) -> tuple[SyntheticSet, dict]:
    """The images of one setting, and the synthesis figures (none for real images or the build's own)."""
    if SETTINGS[setting] == "build":
        return read_synthetic(builds / name / "synthetic.npz"), {}
    if SETTINGS[setting] is None:
        real = load_labelled_images(DATA, "train", ZOO[name].normalize, count)
        images = torch.from_numpy(real.images)
        logits = teacher_logits(teacher, images)
        return SyntheticSet(images, logits.argmax(1), logits, "real", {}), {}
    if isinstance(SETTINGS[setting], tuple):
        halves = [training_images(name, part, teacher, count // 2 + (count % 2) * (i == 0), seed + i, builds) for i, part in enumerate(SETTINGS[setting])]
        sets = [half for half, _ in halves]
        mixed = SyntheticSet(
            torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]), torch.cat([s.teacher_logits for s in sets]), sets[0].method, {}, {}
        )
        return mixed, {f"{part}_{key}": value for (_, figures), part in zip(halves, SETTINGS[setting]) for key, value in figures.items()}
    synthetic = synthesize(teacher, SynthConfig(count=count, seed=seed, **SETTINGS[setting]))
    keep = ("target_agreement", "bn_error", "diversity", "iterations_mean", "seconds")
    return synthetic, {k: round(float(synthetic.metrics[k]), 4) for k in keep if k in synthetic.metrics}


def run(name: str, setting: str, args, log) -> dict:
    teacher = load_teacher(name)
    converted = read_spiking(args.builds / name / "snn.pt")
    images, synth = training_images(name, setting, teacher, args.count, args.seed, args.builds)
    started = time.perf_counter()
    config = BUDGETS["standard"].privatize_config(seed=args.seed)
    schedule = config.schedule if args.schedule is None else args.schedule
    temporal = config.temporal_steps if args.temporal_steps is None else args.temporal_steps
    config = dataclasses.replace(
        config, schedule=schedule, temporal_steps=temporal, final_steps=args.final_steps or config.final_steps, train=dataclasses.replace(config.train, **args.train)
    )
    model = privatize(converted, teacher, images, config)
    seconds = time.perf_counter() - started
    test = load_labelled_images(DATA, "test", ZOO[name].normalize, args.limit)
    predictions = snn_logits(model, torch.from_numpy(test.images), 1).argmax(1)
    row = {
        "model": name,
        "setting": setting,
        "synth_config": SETTINGS[setting],
        "schedule": list(config.schedule),
        "temporal_steps": config.temporal_steps,
        "final_steps": config.final_steps,
        "train": args.train,
        "synth": synth,
        "private_t1_accuracy": round(float((predictions == torch.from_numpy(test.labels)).float().mean()), 4),
        "holdout_agreement": model.metrics["privatize"]["holdout_agreement"],
        "privatize_seconds": round(seconds, 1),
    }
    log(f"{name} {setting}: private T=1 {100 * row['private_t1_accuracy']:.2f}%, held-out agreement {row['holdout_agreement']}, synth {synth}")
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| model | training images | T=1 steps | private T=1 | held-out agreement | synth s | iterations/image | diversity | BN error |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["synth"]
        lines.append(
            f"| {r['model']} | {r['setting']} | {r.get('final_steps', '')} | {100 * r['private_t1_accuracy']:.2f} | {r['holdout_agreement']:.3f} | {s.get('seconds', '')} | "
            f"{s.get('iterations_mean', '')} | {s.get('diversity', '')} | {s.get('bn_error', '')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(ZOO))
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--builds", type=Path, default=ROOT / "bench" / "builds", help="earlier standard builds (BUILDS/<model>/snn.pt)")
    parser.add_argument("--count", type=int, default=2048, help="training images per setting")
    parser.add_argument("--final-steps", type=int, default=0, help="privatize steps at T=1 (0: the standard budget's)")
    parser.add_argument("--schedule", default=None, help="T of the temporal phases before T=1, e.g. 4,2; 'none' for T=1 only (default: the standard budget's)")
    parser.add_argument("--temporal-steps", type=int, default=None, help="steps in each temporal phase (default: the standard budget's)")
    parser.add_argument("--limit", type=int, default=10000, help="test images evaluated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train", default="", help="change TrainConfig fields of the privatize stage, e.g. norm=true,lr=0.003")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "privatize_data_fmnist.json")
    args = parser.parse_args()
    models = known_names(args.models, ZOO)
    settings = known_names(args.settings, SETTINGS, "setting")
    args.train = parse_train(args.train, parser)
    if args.schedule is not None:
        try:
            args.schedule = () if args.schedule == "none" else tuple(int(t) for t in args.schedule.split(","))
        except ValueError:
            parser.error(f"--schedule {args.schedule}: expected T values such as 4,2, or none")
    require_data()
    missing = [str(args.builds / m / "snn.pt") for m in models if not (args.builds / m / "snn.pt").is_file()]
    if missing:
        sys.exit(f"error: {', '.join(missing)} not found; run bench/private_binary_fmnist.py --keep {args.builds} first")
    torch.set_num_threads(args.threads)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    rows = [run(name, setting, args, log) for name in models for setting in settings]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": args.threads, "count": args.count, "rows": rows}, indent=2) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
