"""Benchmark: SpikingJelly 2.0's ANN→SNN conversion beside edgesnn's, on the zoo teachers and the Fashion-MNIST test set.

    bash bench/peers_setup.sh                     # once: makes bench/.peers-venv
    bench/.peers-venv/bin/python bench/peers.py [--models fmnist_resnet8,fmnist_vgg] [--limit 10000] [--max-timesteps 128] [--builds bench/builds]

Runs in its own virtualenv (bench/.peers-venv, made by bench/peers_setup.sh), so
that SpikingJelly never becomes a dependency of edgesnn. For each zoo model:

- the teacher (the zoo's nn.Module with its trained weights): accuracy, ms/image;
- SpikingJelly 2.0.0: ``ann2snn.Converter(recipe=ann2snn.RateCodingRecipe(loader, mode=M))``
  for M = "max" and "99.9%", calibrated on REAL training images (the first
  --calibration, 10,000 by default, in batches of 100 as in SpikingJelly's MNIST
  example, which uses all 60,000: the thresholds are a running average with
  momentum 0.1, so the last few dozen batches set them; "99.9%" sorts every
  activation of every batch, which costs minutes for 60,000 images); IF neurons with soft reset, the image fed as a constant current
  every step, the outputs summed over T steps, ``functional.reset_net`` between
  batches. If the zoo module does not convert as written, the error is recorded
  and the module is rewritten (``REWRITES``) into an equivalent one that does;
- edgesnn's conversion, calibrated on the synthetic images of the build in
  --builds (synthetic.npz, with the build's convert configuration; the
  synthesis seconds are the build's), converted afresh here and timed;
- edgesnn's private binary T=1 model (binary.pt of the build).

Accuracy at T = 1, 2, 4 … --max-timesteps on the first --limit test images (one
run of --max-timesteps steps; the output averaged over the first t steps gives
the accuracy at T=t, which is what a run of t steps gives); conversion seconds;
inference ms/image at the smallest T within 1 point of the teacher, at batch 1
and batched (SpikingJelly and the teacher: --batch images per call; edgesnn:
its own evaluation batching, 1024/T images per call), the fastest of 3 passes;
peak RSS. Each
(model, method) runs in its own process, so that its peak RSS is its own: it
includes the test images and, for SpikingJelly, the calibration images.

Prints Markdown tables for BENCHMARKS.md and writes the raw figures to
bench/results/peers.json. Use --limit 200 --max-timesteps 8 for a quick run, and
--only (e.g. "spikingjelly:99.9%,edgesnn:binary") to run some of the jobs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from edgesnn.convert import ConvertConfig, SpikingNetwork, convert
from edgesnn.datasets import load_labelled_images
from edgesnn.pipeline import load_teacher, read_spiking, read_synthetic
from edgesnn.privatize import EVAL_BATCH
from edgesnn.zoo import ZOO
from edgesnn.zoo.models import BasicBlock

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: bench/ is on the path; imported: make it so
from common import DATA, ROOT, known_names, require_data  # noqa: E402

TIMESTEPS = [1, 2, 4, 8, 16, 32, 64, 128]
SPIKINGJELLY_MODES = ["max", "99.9%"]
JOBS = [f"spikingjelly:{mode}" for mode in SPIKINGJELLY_MODES] + ["edgesnn:convert", "edgesnn:binary"]
CALIBRATION_BATCH = 100  # SpikingJelly's MNIST example calibrates in batches of 100
WARMUP_SECONDS = 1.0  # PyTorch's first calls at a new shape are slow: warm up before timing
TIMING_REPEATS = 3  # timed passes; the fastest is reported
WITHIN = 0.01  # "within 1 point of the teacher"
BUILD_STAGES = ["load", "synth", "convert", "privatize", "binarize"]  # what a build runs up to binary.pt


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def first_line(error: BaseException) -> str:
    """The error's type and first line, without memory addresses (so that reports compare across runs)."""
    text = re.sub(r" at 0x[0-9a-f]+", "", (str(error).strip().splitlines() or [""])[0][:300])
    return f"{type(error).__name__}: {text}"


# ---------------------------------------------------------------------------
# Rewrites SpikingJelly needs: its RateCodingRecipe turns only nn.ReLU *modules*
# into IF neurons, and its step-mode adapter rejects functional calls such as F.relu.


class ReLUModuleBlock(nn.Module):
    """The zoo's BasicBlock with its two functional ReLUs as nn.ReLU modules (same weights, same function)."""

    def __init__(self, block: BasicBlock):
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2, self.shortcut = block.conv1, block.bn1, block.conv2, block.bn2, block.shortcut
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


# Module type -> rewrite into an equivalent module that SpikingJelly converts; a description for the report.
REWRITES: dict[type, Callable[[nn.Module], nn.Module]] = {BasicBlock: ReLUModuleBlock}
REWRITE_NOTES: dict[type, str] = {BasicBlock: "F.relu → nn.ReLU"}


def rewritten(module: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of ``module`` with every submodule of a type in REWRITES replaced; what was rewritten, per type."""
    module = copy.deepcopy(module)
    replaced: dict[type, list[str]] = {}
    for name, child in list(module.named_modules()):
        if type(child) in REWRITES:
            parent_name, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(parent_name), leaf, REWRITES[type(child)](child))
            replaced.setdefault(type(child), []).append(name)
    return module, [f"{REWRITE_NOTES[kind]} in {kind.__name__} ({', '.join(names)})" for kind, names in replaced.items()]


# ---------------------------------------------------------------------------
# Measurement


def zoo_module(name: str) -> nn.Module:
    """The zoo teacher as the nn.Module it was trained as, with its trained weights."""
    entry = ZOO[name]
    module = entry.factory()
    module.load_state_dict(torch.load(entry.weights_path, map_location="cpu", weights_only=True))
    return module.eval()


def test_images(name: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    test = load_labelled_images(DATA, "test", ZOO[name].normalize, limit)
    return torch.from_numpy(test.images), torch.from_numpy(test.labels)


def accuracy_at(correct: torch.Tensor, count: int, max_timesteps: int) -> dict[str, float]:
    """Accuracy at each reported T from the per-step counts of correct cumulative predictions."""
    return {str(t): round(float(correct[t - 1]) / count, 4) for t in TIMESTEPS if t <= max_timesteps}


def smallest_within(curve: dict[str, float], teacher_accuracy: float) -> int | None:
    """The smallest reported T whose accuracy is within 1 point of the teacher's, or None."""
    reached = [int(t) for t, a in curve.items() if a >= teacher_accuracy - WITHIN - 1e-9]
    return min(reached) if reached else None


def ms_per_image(run: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch: int) -> float:
    """Wall time of ``run`` over ``images`` in batches of ``batch``: the fastest of TIMING_REPEATS passes, after warm-up.

    The fastest pass, as ``timeit`` advises: other work on the machine only ever adds time.
    """
    with torch.no_grad():
        started, calls = time.perf_counter(), 0
        while calls < 3 or time.perf_counter() - started < WARMUP_SECONDS:
            start = (calls * batch) % len(images)
            run(images[start : start + batch])
            calls += 1
        passes = []
        for _ in range(TIMING_REPEATS):
            started = time.perf_counter()
            for i in range(0, len(images), batch):
                run(images[i : i + batch])
            passes.append(time.perf_counter() - started)
    return round(1000 * min(passes) / len(images), 4)


def timings(run: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch: int, args) -> dict:
    """ms/image one image at a time (an edge device's case) and in batches of ``batch``."""
    return {
        "ms_per_image_batch1": ms_per_image(run, images[: args.latency_images], 1),
        "ms_per_image_batched": ms_per_image(run, images[: args.timing_images], batch),
        "batch": batch,
        "latency_images": min(args.latency_images, len(images)),
        "timing_images": min(args.timing_images, len(images)),
    }


def run_teacher(name: str, images: torch.Tensor, labels: torch.Tensor, args) -> dict:
    module = zoo_module(name)
    with torch.no_grad():
        predictions = torch.cat([module(images[i : i + args.batch]).argmax(1) for i in range(0, len(images), args.batch)])
    accuracy = round(float((predictions == labels).float().mean()), 4)
    log(f"{name} teacher: {100 * accuracy:.2f}%")
    return {"accuracy": accuracy, **timings(module, images, args.batch, args)}


def spikingjelly_run(snn: nn.Module, timesteps: int) -> Callable[[torch.Tensor], torch.Tensor]:
    from spikingjelly.activation_based import functional

    def run(x: torch.Tensor) -> torch.Tensor:
        functional.reset_net(snn)
        total = snn(x)
        for _ in range(timesteps - 1):
            total = total + snn(x)
        return total

    return run


def run_spikingjelly(name: str, mode: str, images: torch.Tensor, labels: torch.Tensor, teacher_accuracy: float, args) -> dict:
    from spikingjelly.activation_based import ann2snn, functional, neuron

    train = load_labelled_images(DATA, "train", ZOO[name].normalize, args.calibration)
    calibration = torch.from_numpy(train.images)
    loader = [calibration[i : i + CALIBRATION_BATCH] for i in range(0, len(calibration), CALIBRATION_BATCH)]
    module = zoo_module(name)
    row: dict = {"mode": mode, "calibration_images": len(calibration), "rewrite": None}

    def converted(ann: nn.Module) -> tuple[nn.Module, float]:
        started = time.perf_counter()
        snn = ann2snn.Converter(recipe=ann2snn.RateCodingRecipe(loader, mode=mode)).convert(copy.deepcopy(ann))
        return snn.eval(), round(time.perf_counter() - started, 2)

    try:
        snn, seconds = converted(module)
    except Exception as error:  # noqa: BLE001 — any failure of the peer is a finding to record
        rewrite, replaced = rewritten(module)
        with torch.no_grad():
            difference = float((rewrite(images[:256]) - module(images[:256])).abs().max())
        row["rewrite"] = {"error_as_written": first_line(error), "replaced": replaced, "max_logit_difference": difference}
        log(f"{name} SpikingJelly {mode}: does not convert as written ({first_line(error)}); rewritten: {', '.join(replaced)}")
        snn, seconds = converted(rewrite)
    row["convert_seconds"] = seconds
    row["if_layers"] = sum(isinstance(m, neuron.IFNode) for m in snn.modules())
    row["relu_modules_left"] = sum(isinstance(m, nn.ReLU) for m in snn.modules())
    log(f"{name} SpikingJelly {mode}: converted in {seconds} s, {row['if_layers']} IF layers")
    if args.timed_t:
        row["timed_t"] = args.timed_t
    else:
        correct = torch.zeros(args.max_timesteps)
        with torch.no_grad():
            for i in range(0, len(images), args.batch):
                functional.reset_net(snn)
                x, y = images[i : i + args.batch], labels[i : i + args.batch]
                total = torch.zeros(())
                for step in range(args.max_timesteps):
                    total = total + snn(x)
                    correct[step] += float((total.argmax(1) == y).sum())
        functional.reset_net(snn)
        row["accuracy"] = accuracy_at(correct, len(images), args.max_timesteps)
        row["t_within_1pt"] = smallest_within(row["accuracy"], teacher_accuracy)
        row["timed_t"] = row["t_within_1pt"] or max(int(t) for t in row["accuracy"])
        log(f"{name} SpikingJelly {mode}: " + ", ".join(f"T={t} {100 * a:.2f}" for t, a in row["accuracy"].items()))
    run = spikingjelly_run(snn, row["timed_t"])
    row.update(timings(run, images, args.batch, args))
    log(f"{name} SpikingJelly {mode}: {row['ms_per_image_batch1']} ms/image at T={row['timed_t']}")
    return row


def edgesnn_run(model, timesteps: int) -> Callable[[torch.Tensor], torch.Tensor]:
    network = SpikingNetwork(model)
    return lambda x: network(x, timesteps)[-1]


def run_edgesnn_convert(name: str, images: torch.Tensor, labels: torch.Tensor, teacher_accuracy: float, args) -> dict:
    folder = args.builds / name
    manifest = json.loads((folder / "manifest.json").read_text())
    synthetic = read_synthetic(folder / "synthetic.npz")
    config = ConvertConfig(**manifest["stages"]["convert"]["config"]["convert"])
    started = time.perf_counter()
    teacher = load_teacher(name)
    capture_seconds = time.perf_counter() - started
    model = convert(teacher, synthetic, config)
    seconds = round(time.perf_counter() - started, 2)
    row: dict = {
        "calibration_images": len(synthetic.images) if not config.calibration_images else config.calibration_images,
        "synthesis": synthetic.method,
        "synth_seconds_in_build": manifest["stages"]["synth"]["seconds"],
        "convert_seconds": seconds,
        "capture_seconds": round(capture_seconds, 2),
        "config": {k: v for k, v in manifest["stages"]["convert"]["config"]["convert"].items()},
        "if_layers": len(model.thresholds),
    }
    if (folder / "snn.pt").is_file():
        built = read_spiking(folder / "snn.pt")
        row["max_threshold_difference_to_build"] = max(float((built.thresholds[n] - t).abs().max()) for n, t in model.thresholds.items())
    log(f"{name} edgesnn convert: {seconds} s (capture {row['capture_seconds']} s) on {row['calibration_images']} synthetic images")
    if args.timed_t:
        row["timed_t"] = args.timed_t
    else:
        network = SpikingNetwork(model)
        batch = max(1, EVAL_BATCH // args.max_timesteps)
        correct = torch.zeros(args.max_timesteps)
        with torch.no_grad():
            for i in range(0, len(images), batch):
                means = network(images[i : i + batch], args.max_timesteps)  # T×B×classes, averaged over the first t steps
                correct += (means.argmax(-1) == labels[i : i + batch]).sum(1).float()
        row["accuracy"] = accuracy_at(correct, len(images), args.max_timesteps)
        row["t_within_1pt"] = smallest_within(row["accuracy"], teacher_accuracy)
        row["timed_t"] = row["t_within_1pt"] or max(int(t) for t in row["accuracy"])
        log(f"{name} edgesnn convert: " + ", ".join(f"T={t} {100 * a:.2f}" for t, a in row["accuracy"].items()))
    run = edgesnn_run(model, row["timed_t"])
    row.update(timings(run, images, max(1, EVAL_BATCH // row["timed_t"]), args))
    log(f"{name} edgesnn convert: {row['ms_per_image_batch1']} ms/image at T={row['timed_t']}")
    return row


def run_edgesnn_binary(name: str, images: torch.Tensor, labels: torch.Tensor, args) -> dict:
    folder = args.builds / name
    manifest = json.loads((folder / "manifest.json").read_text())
    model = read_spiking(folder / "binary.pt")
    run = edgesnn_run(model, 1)
    with torch.no_grad():
        predictions = torch.cat([run(images[i : i + EVAL_BATCH]).argmax(1) for i in range(0, len(images), EVAL_BATCH)])
    stages = manifest["stages"]
    row = {
        "accuracy": {"1": round(float((predictions == labels).float().mean()), 4)},
        "timed_t": 1,
        "build_seconds": round(sum(stages[s]["seconds"] for s in BUILD_STAGES if s in stages), 1),
        "build_stage_seconds": {s: stages[s]["seconds"] for s in BUILD_STAGES if s in stages},
        "build_peak_rss_mb": max(stages[s]["peak_rss_mb"] for s in BUILD_STAGES if s in stages),
        "synthetic_images": stages["synth"]["metrics"].get("images"),
        "built": manifest.get("created"),
    }
    row.update(timings(run, images, EVAL_BATCH, args))
    log(f"{name} edgesnn private binary: T=1 {100 * row['accuracy']['1']:.2f}%, {row['ms_per_image_batch1']} ms/image")
    return row


def run_job(job: str, name: str, args) -> dict:
    """One measurement in this process: 'teacher', 'spikingjelly:<mode>', 'edgesnn:convert' or 'edgesnn:binary'."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images, labels = test_images(name, args.limit)
    started = time.perf_counter()
    if job == "teacher":
        row = run_teacher(name, images, labels, args)
    elif job.startswith("spikingjelly:"):
        row = run_spikingjelly(name, job.split(":", 1)[1], images, labels, args.teacher_accuracy, args)
    elif job == "edgesnn:convert":
        row = run_edgesnn_convert(name, images, labels, args.teacher_accuracy, args)
    elif job == "edgesnn:binary":
        row = run_edgesnn_binary(name, images, labels, args)
    else:
        raise SystemExit(f"error: unknown job {job!r}; valid: teacher, spikingjelly:<mode>, edgesnn:convert, edgesnn:binary")
    return {**row, "job_seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": peak_rss_mb()}


# ---------------------------------------------------------------------------
# Orchestration and report


def in_process(job: str, name: str, args, teacher_accuracy: float | None = None, timed_t: int | None = None) -> dict:
    """Run one job in a fresh process of this interpreter (its own peak RSS); its row, or the error."""
    command = [sys.executable, __file__, "--job", job, "--models", name, "--limit", str(args.limit), "--max-timesteps", str(args.max_timesteps),
               "--calibration", str(args.calibration), "--batch", str(args.batch), "--latency-images", str(args.latency_images),
               "--timing-images", str(args.timing_images), "--threads", str(args.threads), "--builds", str(args.builds)]
    if teacher_accuracy is not None:
        command += ["--teacher-accuracy", str(teacher_accuracy)]
    if timed_t is not None:
        command += ["--timed-t", str(timed_t)]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    if result.returncode != 0:
        log(f"{name} {job}: failed (exit {result.returncode})")
        return {"error": f"exit {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_model(name: str, args) -> dict:
    """The teacher, then each job of ``args.only`` (all by default) for one zoo model."""
    teacher = in_process("teacher", name, args)
    accuracy = teacher["accuracy"]
    result = {"model": name, "teacher": teacher, "spikingjelly": {mode: in_process(f"spikingjelly:{mode}", name, args, accuracy) for mode in SPIKINGJELLY_MODES if f"spikingjelly:{mode}" in args.only}}
    folder = args.builds / name
    if "edgesnn:convert" in args.only:
        result["edgesnn_convert"] = in_process("edgesnn:convert", name, args, accuracy) if (folder / "synthetic.npz").is_file() else {"error": f"no build in {folder}"}
    if "edgesnn:binary" in args.only:
        result["edgesnn_binary"] = in_process("edgesnn:binary", name, args) if (folder / "binary.pt").is_file() else {"error": f"no binary.pt in {folder}"}
    return result


def headline(r: dict) -> str | None:
    """T=1 binary against the SpikingJelly mode that gets within 1 point of the teacher soonest (or is best at the largest T)."""
    binary = r.get("edgesnn_binary", {"error": "not run"})
    peers = {mode: row for mode, row in r["spikingjelly"].items() if "error" not in row}
    if "error" in binary or not peers:
        return None
    reached = [(row["t_within_1pt"], -row["accuracy"][str(row["t_within_1pt"])], mode) for mode, row in peers.items() if row["t_within_1pt"]]
    if reached:
        t, _, mode = min(reached)
        where = f"at T={t}, the smallest T within 1 point of the teacher"
        less = "less"
    else:
        mode = max(peers, key=lambda m: peers[m]["accuracy"][str(peers[m]["timed_t"])])
        t = peers[mode]["timed_t"]
        where = f"at T={t}, still not within 1 point of the teacher"
        less = "less, at least,"
    peer = peers[mode]
    peer_accuracy, binary_accuracy = peer["accuracy"][str(t)], binary["accuracy"]["1"]
    return (
        f"{r['model']}: edgesnn's private binary T=1 model vs SpikingJelly ({mode}) {where}: "
        f"{peer['ms_per_image_batch1'] / binary['ms_per_image_batch1']:.0f}× {less} inference time per image at batch 1 "
        f"({peer['ms_per_image_batched'] / binary['ms_per_image_batched']:.0f}× batched), at {100 * (binary_accuracy - peer_accuracy):+.2f} points of accuracy "
        f"({100 * binary_accuracy:.2f}% vs {100 * peer_accuracy:.2f}%; teacher {100 * r['teacher']['accuracy']:.2f}%)"
    )


def markdown(results: list[dict], max_timesteps: int) -> str:
    steps = [t for t in TIMESTEPS if t <= max_timesteps]
    lines = [
        "| model | method | calibration | teacher | " + " | ".join(f"T={t}" for t in steps) + " | smallest T within 1 pt |",
        "|" + "---|" * (5 + len(steps)),
    ]

    def methods(r: dict):
        for mode, row in r["spikingjelly"].items():
            yield f"SpikingJelly 2.0.0, {mode}", row, f"real train ({row.get('calibration_images', '')})"
        if "edgesnn_convert" in r:
            row = r["edgesnn_convert"]
            yield "edgesnn convert", row, f"synthetic ({row.get('calibration_images', '')})"
        if "edgesnn_binary" in r:
            row = r["edgesnn_binary"]
            yield "edgesnn private + binary", row, f"synthetic ({row.get('synthetic_images', '')})"

    for r in results:
        for method, row, calibration in methods(r):
            if "error" in row:
                lines.append(f"| {r['model']} | {method} | {row['error']} |")
                continue
            accuracy = " | ".join(f"{100 * row['accuracy'][str(t)]:.2f}" if str(t) in row["accuracy"] else "" for t in steps)
            within = row.get("t_within_1pt") or ("T=1 model" if method.endswith("binary") else f"> {max_timesteps}")
            lines.append(f"| {r['model']} | {method} | {calibration} | {100 * r['teacher']['accuracy']:.2f} | {accuracy} | {within} |")
    lines += ["", "| model | method | conversion s | timed at T | accuracy there | ms/image, batch 1 | ms/image, batched (batch) | peak RSS MiB | rewritten to convert |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = r["teacher"]
        lines.append(f"| {r['model']} | teacher (ANN) | | | {100 * t['accuracy']:.2f} | {t['ms_per_image_batch1']:.3f} | {t['ms_per_image_batched']:.3f} ({t['batch']}) | {t['peak_rss_mb']:.0f} | |")
        for method, row, _ in methods(r):
            if "error" in row:
                continue
            if method.endswith("binary"):
                conversion = f"{row['build_seconds']:.0f} (build)"
            elif method == "edgesnn convert":
                conversion = f"{row['convert_seconds']:.1f} (+ {row['synth_seconds_in_build']:.0f} synthesis)"
            else:
                conversion = f"{row['convert_seconds']:.1f}"
            rewrite = row.get("rewrite")
            note = "yes: " + ", ".join(rewrite["replaced"]) if rewrite else ("no" if method.startswith("SpikingJelly") else "")
            lines.append(
                f"| {r['model']} | {method} | {conversion} | {row['timed_t']} | {100 * row['accuracy'][str(row['timed_t'])]:.2f} | {row['ms_per_image_batch1']:.3f} | "
                f"{row['ms_per_image_batched']:.3f} ({row['batch']}) | {row['peak_rss_mb']:.0f} | {note} |"
            )
    notes = [f"- {r['model']}, SpikingJelly {mode}: as written, `{row['rewrite']['error_as_written']}`" for r in results for mode, row in r["spikingjelly"].items() if row.get("rewrite")]
    lines += [""] + (notes or ["- Every zoo module converted with SpikingJelly as written."])
    lines += [""] + [f"- {text}" for text in (headline(r) for r in results) if text]
    return "\n".join(lines)


def retime(report: dict, args) -> None:
    """Conversion seconds and ms/image measured again (e.g. on a machine quieter than during the accuracy run)."""
    for result in report["results"]:
        name = result["model"]
        teacher = in_process("teacher", name, args)
        result["teacher"].update({k: v for k, v in teacher.items() if k.startswith("ms_") or k == "job_seconds"})
        rows = [(f"spikingjelly:{mode}", row) for mode, row in result["spikingjelly"].items()]
        rows += [(job, result[key]) for job, key in (("edgesnn:convert", "edgesnn_convert"), ("edgesnn:binary", "edgesnn_binary")) if key in result]
        for job, row in rows:
            if "error" in row:
                continue
            fresh = in_process(job, name, args, result["teacher"]["accuracy"], None if job == "edgesnn:binary" else row["timed_t"])
            if "error" in fresh:
                row["retime_error"] = fresh["error"]
                continue
            # Peak RSS stays the accuracy run's: it is the larger, and contention does not change it.
            row.update({k: fresh[k] for k in ("ms_per_image_batch1", "ms_per_image_batched", "batch", "latency_images", "timing_images", "convert_seconds", "capture_seconds") if k in fresh})
    report["retimed"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report["headlines"] = [text for text in (headline(r) for r in report["results"]) if text]
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(title(report))
    print(markdown(report["results"], report["max_timesteps"]))


def title(report: dict) -> str:
    return f"peers — {report['date']}, {report['machine']}, {report['limit']} test images, T ≤ {report['max_timesteps']}, {report['seconds']:.0f} s\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(ZOO))
    parser.add_argument("--limit", type=int, default=10000, help="test images evaluated")
    parser.add_argument("--max-timesteps", type=int, default=max(TIMESTEPS), help="largest T evaluated")
    parser.add_argument("--calibration", type=int, default=10000, help="real training images SpikingJelly calibrates on")
    parser.add_argument("--batch", type=int, default=256, help="test images per call for the teacher and SpikingJelly")
    parser.add_argument("--latency-images", type=int, default=100, help="test images timed one at a time")
    parser.add_argument("--timing-images", type=int, default=1000, help="test images timed in batches")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--builds", type=Path, default=ROOT / "bench" / "builds", help="edgesnn builds (BUILDS/<model>/synthetic.npz, snn.pt, binary.pt)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "peers.json")
    parser.add_argument("--only", default=",".join(JOBS), help=f"jobs to run beside the teacher (default all: {','.join(JOBS).replace('%', '%%')})")
    parser.add_argument("--render", type=Path, help="print the tables of an earlier run's JSON and exit")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--teacher-accuracy", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--timed-t", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--retime", type=Path, help="convert and time again at the T values of an earlier run's JSON, keeping its accuracies; writes --out")
    args = parser.parse_args()
    require_data()
    args.only = [job for job in args.only.split(",") if job]
    unknown = [job for job in args.only if job not in JOBS]
    if unknown:
        sys.exit(f"error: --only {','.join(unknown)}: unknown job; valid: {', '.join(JOBS)}")
    if args.job:
        print(json.dumps(run_job(args.job, args.models, args)))
        return
    if args.retime:
        retime(json.loads(args.retime.read_text()), args)
        return
    if args.render:
        report = json.loads(args.render.read_text())
        print(title(report))
        print(markdown(report["results"], report["max_timesteps"]))
        return
    from importlib.metadata import version

    started = time.perf_counter()
    machine = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch threads, torch {torch.__version__}, spikingjelly {version('spikingjelly')}, Python {platform.python_version()}"
    models = known_names(args.models, ZOO)
    results: list[dict] = []
    for name in models:
        results.append(run_model(name, args))
        report = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine,
            "limit": args.limit,
            "max_timesteps": args.max_timesteps,
            "calibration": args.calibration,
            "jobs": args.only,
            "complete": len(results) == len(models),  # written after each model, so that a cut-off run leaves its figures
            "seconds": round(time.perf_counter() - started, 1),
            "headlines": [text for text in (headline(r) for r in results) if text],
            "results": results,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(title(report))
    print(markdown(results, args.max_timesteps))


if __name__ == "__main__":
    main()
