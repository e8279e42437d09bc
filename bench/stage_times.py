"""Benchmark: seconds of the convert, export and profile stages of a build, each on its own.

    .venv/bin/python bench/stage_times.py --label after [--models fmnist_resnet8,fmnist_vgg] [--repeats 5] [--warm 1] [--threads 2]
    .venv/bin/python bench/stage_times.py --label before=/tmp/edgesnn-before --label after --repeats 5   # interleaved A/B
    .venv/bin/python bench/stage_times.py --render

The inputs are those a build gives these stages, read from the build folder
bench/builds/<model> (``edgesnn build <model> --private --binary --out
bench/builds/<model>``; nothing is written there): teacher.pt and
synthetic.npz for convert, the final model (the manifest's ``final_model``)
and synthetic.npz for export and profile. Each stage runs through the
pipeline's own compute function, as ``build`` runs it minus writing the files:

- convert: ``pipeline._compute_snn`` with the ConvertConfig the manifest records;
- export: ``pipeline._compute_export``, every target the model allows, the
  first 16 synthetic images as golden images, the build's stamp;
- profile: ``pipeline._compute_profile`` with ``build_profile_config(T)``.

Each repeat is a fresh process that reads the inputs, then runs convert,
export and profile once each in the build's order, so that first-call costs
(importing torch.onnx, compiling the crossbar readout kernel) count as they do
in a build ("cold"); then ``--warm`` more calls of each stage in the same
process ("warm", the fastest of them). Reported: the fastest of ``--repeats``
processes, in seconds, with 2 torch threads unless ``--threads`` says otherwise.

``--label NAME`` stores the run under NAME in bench/results/stage_times.json;
``--label NAME=TREE`` runs the edgesnn of another source tree (for instance
``git archive COMMIT | tar -x -C TREE``), and with several labels the
repeats alternate between them (A, B, A, B, ...), so that a machine shared
with other jobs slows each side alike. A fingerprint of each stage's result
(sha256 over its tensors, files and figures, wall-time fields left out) is
stored with each label: equal fingerprints mean the stage computed the same
thing (export: model.onnx keeps torch.onnx's per-node metadata, stack traces
with the source files' paths and line numbers, so its fingerprint also changes
with the tree and with edits to the traced code). ``--render`` prints the
Markdown table of every label.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "stage_times.json"
BUILDS = ROOT / "bench" / "builds"
STAGES = ("convert", "export", "profile")
PACKAGES = {"edgesnn": "edgesnn", "edgesnn.synth": "synth", "edgesnn.export": "export", "edgesnn.firmware_stubs": "firmware_stubs"}


# ---------------------------------------------------------------------------
# Worker: one process, one model, every stage


class _TreeFinder:
    """Imports the edgesnn packages from another source tree (``--label NAME=TREE``)."""

    def __init__(self, tree: Path):
        self.roots = {name: tree / folder for name, folder in PACKAGES.items()}

    def find_spec(self, name, path=None, target=None):
        root = self.roots.get(name)
        if root is None:
            return None
        return importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])


def _digest(value, digest) -> None:
    """Feed a nested value (dicts, lists, tensors, arrays, bytes, scalars) into ``digest``, canonically."""
    import numpy as np
    import torch

    if isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(f"<{key}>".encode())
            _digest(value[key], digest)
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _digest(item, digest)
        digest.update(b"]")
    elif isinstance(value, torch.Tensor):
        digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
        digest.update(value.detach().contiguous().cpu().numpy().tobytes())
    elif isinstance(value, np.ndarray):
        digest.update(f"{value.dtype}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, bytes):
        digest.update(value)
    else:
        digest.update(repr(value).encode())


def _without_seconds(value):
    """The value with every ``seconds`` entry removed (wall time differs from run to run)."""
    if isinstance(value, dict):
        return {key: _without_seconds(item) for key, item in value.items() if key != "seconds"}
    if isinstance(value, list):
        return [_without_seconds(item) for item in value]
    return value


def fingerprint(value) -> str:
    digest = hashlib.sha256()
    _digest(_without_seconds(value), digest)
    return digest.hexdigest()[:16]


def worker(model_name: str, warm: int, threads: int) -> dict:
    """Cold and warm seconds of each stage of one model's build folder, and its results' fingerprints."""
    import torch

    torch.set_num_threads(threads)
    from edgesnn import __version__, pipeline
    from edgesnn.convert import ConvertConfig, spiking_state
    from edgesnn.export import parse_targets
    from edgesnn.profile import build_profile_config

    folder = BUILDS / model_name
    manifest = json.loads((folder / pipeline.MANIFEST).read_text())
    teacher = pipeline.read_teacher(folder / pipeline.TEACHER_FILE)
    synthetic = pipeline.read_synthetic(folder / pipeline.SYNTHETIC_FILE)
    final_file = manifest["final_model"]
    final = pipeline.read_spiking(folder / final_file)
    final_digest = pipeline.sha256_file(folder / final_file)
    convert_config = ConvertConfig(**manifest["stages"]["convert"]["config"]["convert"])
    targets = parse_targets("all", final)
    golden = synthetic.images[: pipeline.GOLDEN_COUNT]
    stamp = f"edgesnn {__version__} from {final_file} (sha256 {final_digest[:16]})"
    profile_config = build_profile_config(final.timesteps)
    source = f"{len(synthetic.images)} synthetic images (build)"

    stages = {
        "convert": lambda: pipeline._compute_snn(teacher, synthetic, convert_config, lambda *a: None),
        "export": lambda: pipeline._compute_export(final, targets, golden, stamp),
        "profile": lambda: pipeline._compute_profile(teacher, final, synthetic.images, None, profile_config, source, lambda *a: None),
    }

    def result_of(stage: str, output) -> str:
        artifact, files, metrics = output
        if stage == "convert":
            return fingerprint({"model": spiking_state(artifact), "metrics": metrics})
        if stage == "export":
            return fingerprint({"files": files, "metrics": metrics})
        document = dict(artifact.document, target_files={name: Path(path).name for name, path in artifact.document["target_files"].items()})  # paths name the source tree
        return fingerprint({"document": document, "plots": artifact.plots})

    row = {"images": len(synthetic.images), "final_model": final_file, "targets": targets}
    for stage, compute in stages.items():
        started = time.perf_counter()
        output = compute()
        cold = time.perf_counter() - started
        row[stage] = {"cold": cold, "fingerprint": result_of(stage, output)}
    for stage, compute in stages.items():
        times = []
        for _ in range(warm):
            started = time.perf_counter()
            compute()
            times.append(time.perf_counter() - started)
        row[stage]["warm"] = min(times) if times else None
    return row


# ---------------------------------------------------------------------------
# Driver


def _run_worker(tree: Path | None, model: str, warm: int, threads: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", model, "--warm", str(warm), "--threads", str(threads)]
    if tree is not None:
        command += ["--tree", str(tree)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"worker {model} ({tree or 'this tree'}) failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def render(results: dict) -> str:
    labels = list(results["runs"])
    lines = [
        "| model | stage | " + " | ".join(f"{label} cold s | {label} warm s" for label in labels) + " | same result |",
        "|---|---|" + "---|---|" * len(labels) + "---|",
    ]
    models = list(dict.fromkeys(name for run in results["runs"].values() for name in run["models"]))
    for name in models:
        for stage in STAGES:
            cells, prints = [], set()
            for label in labels:
                row = results["runs"][label]["models"].get(name)
                if row is None:
                    cells += ["", ""]
                    continue
                entry = row["stages"][stage]
                cells += [f"{entry['cold']:.2f}", "" if entry["warm"] is None else f"{entry['warm']:.2f}"]
                prints.add(entry["fingerprint"])
            lines.append(f"| {name} | {stage} | " + " | ".join(cells) + f" | {'yes' if len(prints) == 1 else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", action="append", help="NAME, or NAME=TREE to run another source tree's edgesnn; repeat for interleaved A/B runs")
    parser.add_argument("--models", default="fmnist_resnet8,fmnist_vgg", help="build folders under bench/builds")
    parser.add_argument("--repeats", type=int, default=5, help="processes per label and model (the fastest is reported)")
    parser.add_argument("--warm", type=int, default=1, help="further calls of each stage per process")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--render", action="store_true", help="print the table of --out and stop")
    parser.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.tree is not None:
            sys.meta_path.insert(0, _TreeFinder(args.tree.resolve()))
        print(json.dumps(worker(args.worker, args.warm, args.threads)))
        return
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": {}}
    if args.render:
        print(render(results))
        return
    labels = {}
    for text in args.label or ["after"]:
        name, _, tree = text.partition("=")
        labels[name] = Path(tree).resolve() if tree else None
    models = [name for name in args.models.split(",") if name]
    samples: dict[str, dict[str, list[dict]]] = {label: {model: [] for model in models} for label in labels}
    for repeat in range(args.repeats):
        for model in models:
            for label, tree in labels.items():
                row = _run_worker(tree, model, args.warm, args.threads)
                samples[label][model].append(row)
                print(f"{repeat + 1}/{args.repeats} {model} {label}: " + ", ".join(f"{stage} {row[stage]['cold']:.2f} ({row[stage]['warm'] or 0:.2f})" for stage in STAGES), file=sys.stderr)
    machine = {"platform": platform.platform(), "threads": args.threads, "repeats": args.repeats, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for label, tree in labels.items():
        run = {"machine": {**machine, "tree": str(tree) if tree else str(ROOT)}, "models": {}}
        for model, rows in samples[label].items():
            stages = {}
            for stage in STAGES:
                prints = sorted({row[stage]["fingerprint"] for row in rows})
                warm = [row[stage]["warm"] for row in rows if row[stage]["warm"] is not None]
                stages[stage] = {
                    "cold": round(min(row[stage]["cold"] for row in rows), 3),
                    "warm": round(min(warm), 3) if warm else None,
                    "cold_all": [round(row[stage]["cold"], 3) for row in rows],
                    "fingerprint": prints[0] if len(prints) == 1 else prints,
                }
            run["models"][model] = {"images": rows[0]["images"], "final_model": rows[0]["final_model"], "targets": rows[0]["targets"], "stages": stages}
        results["runs"][label] = run
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))


if __name__ == "__main__":
    main()
