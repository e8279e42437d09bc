"""Benchmark: where `edgesnn build --private --binary` spends its time, per stage and per op.

    .venv/bin/python bench/profile_build.py --label after [--models fmnist_resnet8,cifar_resnet20] [--budget fast] [--builds fmnist_resnet8]

For each model: the training step that privatize and binarize repeat (ms per
step at T=1 and T=4, the fastest of --repeats runs of --steps steps, batch 128)
with the torch.profiler table of its top ops, and one DeepInversion batch (ms
per iteration). For the models in --builds, also a whole build with --budget
(the configuration of bench/private_binary_fmnist.py) and its seconds per
stage. cifar_resnet20 is the option-A ResNet-20 of tests/fixtures (3×32×32,
random weights: its accuracy means nothing).

Results are stored under --label in bench/results/profile_build.json, so that a
run before a change and one after it sit side by side; --render prints the
Markdown tables of every label.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from private_binary_fmnist import ROOT, build_config  # noqa: E402

from edgesnn.convert import ConvertConfig, convert  # noqa: E402
from edgesnn.load import LoadConfig  # noqa: E402
from edgesnn.pipeline import build, load_teacher  # noqa: E402
from edgesnn.privatize import TrainConfig, train_spiking  # noqa: E402
from edgesnn.synth import SynthConfig, synthesize  # noqa: E402

OUT = ROOT / "bench" / "results" / "profile_build.json"
RESNET20 = ROOT / "tests" / "fixtures" / "resnet_lambda.py"
TOP_OPS = 8


def teacher_spec(name: str, folder: Path) -> tuple[str, LoadConfig]:
    """The model argument and load config of a zoo name or of cifar_resnet20 (saved into ``folder``)."""
    if name != "cifar_resnet20":
        return name, LoadConfig()
    sys.path.insert(0, str(RESNET20.parent))
    from resnet_lambda import resnet20

    torch.manual_seed(0)
    checkpoint = folder / "resnet20.pt"
    torch.save(resnet20().state_dict(), checkpoint)
    return str(checkpoint), LoadConfig(arch=f"{RESNET20}:resnet20", input_shape=(3, 32, 32))


def training_steps(teacher, steps: int, repeats: int) -> dict:
    """ms per training step at T=1 and T=4 on 256 synthetic images, and the top ops at T=1."""
    synthetic = synthesize(teacher, SynthConfig(count=256, seed=0))
    model = convert(teacher, synthetic, ConvertConfig(timesteps=4))
    result = {}
    for timesteps in (1, 4):
        train_spiking(model, teacher.network, synthetic.images, synthetic.labels, timesteps, 2, TrainConfig())  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            train_spiking(model, teacher.network, synthetic.images, synthetic.labels, timesteps, steps, TrainConfig())
            times.append((time.perf_counter() - started) / steps)
        result[f"ms_per_step_t{timesteps}"] = round(1000 * min(times), 1)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        train_spiking(model, teacher.network, synthetic.images, synthetic.labels, 1, steps, TrainConfig())
    events = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    total = sum(event.self_cpu_time_total for event in events)
    result["top_ops_t1"] = [{"op": event.key, "share": round(event.self_cpu_time_total / total, 4), "calls": event.count} for event in events[:TOP_OPS]]
    return result


def synth_iteration(teacher, repeats: int) -> float:
    """ms per DeepInversion iteration at batch 128 (64 iterations, no early stop)."""
    config = SynthConfig(count=128, iterations=64, min_iterations=63, seed=0)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        synthesize(teacher, config)
        times.append(time.perf_counter() - started)
    return round(1000 * min(times) / 64, 1)


def whole_build(name: str, budget: str, model: str, load: LoadConfig, folder: Path) -> dict:
    config = build_config(model, budget, load)
    started = time.perf_counter()
    result = build(config, folder / "out", progress=lambda *a: None)
    return {
        "budget": budget,
        "build_seconds": round(time.perf_counter() - started, 1),
        "stages": {stage: round(values["seconds"], 1) for stage, values in result.stages.items()},
    }


def render(results: dict) -> str:
    lines = ["| model | label | T=1 ms/step | T=4 ms/step | synth ms/iteration | top ops at T=1 (share of self CPU time) |", "|---|---|---|---|---|---|"]
    for label, run in results["runs"].items():
        for name, row in run["models"].items():
            ops = ", ".join(f"{op['op']} {100 * op['share']:.0f}%" for op in row["top_ops_t1"][:5])
            lines.append(f"| {name} | {label} | {row['ms_per_step_t1']} | {row['ms_per_step_t4']} | {row['synth_ms_per_iteration']} | {ops} |")
    stages = ["load", "synth", "convert", "privatize", "binarize", "export", "profile"]
    lines += ["", "| model | label | budget | build s | " + " | ".join(f"{stage} s" for stage in stages) + " |", "|---|---|---|---|" + "---|" * len(stages)]
    for label, run in results["runs"].items():
        for name, row in run["models"].items():
            if "build" in row:
                build_row = row["build"]
                lines.append(f"| {name} | {label} | {build_row['budget']} | {build_row['build_seconds']} | " + " | ".join(str(build_row["stages"].get(stage, "")) for stage in stages) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="after", help="name of this run in the results (e.g. before, after)")
    parser.add_argument("--models", default="fmnist_resnet8,cifar_resnet20")
    parser.add_argument("--builds", default="fmnist_resnet8", help="models to also build whole ('' for none)")
    parser.add_argument("--budget", default="fast")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--render", action="store_true", help="print the tables of --out and stop")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": {}}
    if args.render:
        print(render(results))
        return
    torch.set_num_threads(args.threads)
    machine = {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    run = {"machine": machine, "models": {}}
    builds = [name for name in args.builds.split(",") if name]
    for name in [name for name in args.models.split(",") if name]:
        with tempfile.TemporaryDirectory() as folder:
            model, load = teacher_spec(name, Path(folder))
            teacher = load_teacher(model, load)
            row = training_steps(teacher, args.steps, args.repeats)
            row["synth_ms_per_iteration"] = synth_iteration(teacher, args.repeats)
            print(f"{name}: {row}", file=sys.stderr)
            if name in builds:
                row["build"] = whole_build(name, args.budget, model, load, Path(folder))
                print(f"{name} build: {row['build']}", file=sys.stderr)
            run["models"][name] = row
    results["runs"][args.label] = run
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))


if __name__ == "__main__":
    main()
