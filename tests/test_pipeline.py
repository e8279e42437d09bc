"""The private binary build as a whole: data-free, resumable, and reported in the documented JSON."""

from __future__ import annotations

import builtins
import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgesnn import datasets, pipeline
from edgesnn.binarize import BinarizeConfig
from edgesnn.cli import app
from edgesnn.convert import ConvertConfig
from edgesnn.pipeline import BuildConfig, build
from edgesnn import neuron_kernel
from edgesnn.privatize import PrivatizeConfig, RekeyConfig, TrainConfig, resolve_precision
from edgesnn.synth import SynthConfig

runner = CliRunner()

TINY = BuildConfig(
    model="fmnist_resnet8",
    synth=SynthConfig(count=60, iterations=4, min_iterations=0),
    convert=ConvertConfig(timesteps=2, bias_correction_images=32),
    privatize=PrivatizeConfig(timesteps=1, schedule=(2,), temporal_steps=2, final_steps=6, train=TrainConfig(batch_size=32)),
    binarize=BinarizeConfig(step_steps=2, final_steps=3, holdout=0.2, max_loss=50.0, train=TrainConfig(batch_size=32)),
    rekey=RekeyConfig(seed=5),  # the default key is secret and new on every run; a seeded one makes reruns comparable
)


def test_interrupted_build_resumes_to_the_same_result(tmp_path) -> None:
    whole = build(TINY, tmp_path / "whole")

    def stop_in_binarize(task: str, done: int, total: int) -> None:
        if task.startswith("bin"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build(TINY, tmp_path / "split", progress=stop_in_binarize)
    assert not (tmp_path / "split" / "binary.pt").exists()
    assert not list((tmp_path / "split").glob(".*.tmp"))  # nothing half-written
    resumed = build(TINY, tmp_path / "split")
    assert {name for name, stage in resumed.stages.items() if stage["resumed"]} == {"load", "synth", "convert", "privatize"}
    assert not resumed.stages["binarize"]["resumed"]
    for name in ("private.pt", "binary.pt"):
        # Same tensors (the files differ only in recorded timings).
        first, second = pipeline.read_spiking(tmp_path / "whole" / name), pipeline.read_spiking(tmp_path / "split" / name)
        for node_a, node_b in zip(first.graph.nodes, second.graph.nodes):
            assert node_a.attrs == node_b.attrs and all(torch.equal(node_a.params[k], node_b.params[k]) for k in node_a.params), (name, node_a.name)
        assert all(torch.equal(first.thresholds[k], second.thresholds[k]) for k in first.thresholds), name
    assert whole.final_file == resumed.final_file == "binary.pt"


def test_build_opens_no_dataset_file(tmp_path, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the build read a dataset")

    for module in (datasets, pipeline):
        monkeypatch.setattr(module, "load_labelled_images", refuse)
    monkeypatch.setattr(datasets, "read_idx", refuse, raising=False)
    opened: list[str] = []
    real_open, real_load = builtins.open, np.load

    def recording_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def recording_load(file, *args, **kwargs):
        opened.append(str(file))
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)
    monkeypatch.setattr(np, "load", recording_load)
    result = build(TINY, tmp_path / "out")
    assert result.final_file == "binary.pt"
    dataset_files = [path for path in opened if "fashion" in path.lower() or "datasets" in path or path.endswith(Path(datasets.PACKAGED_SUBSET).name)]
    assert dataset_files == []
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["datasets_read_by_build"] == [] and manifest["final_model"] == "binary.pt"


def test_private_binary_cli_json(tmp_path) -> None:
    out = tmp_path / "out"
    args = ["build", "--private", "--binary", "--budget", "fast", "--count", "60", "--iterations", "4", "--steps", "6", "--binary-steps", "1"]
    args += ["--out", str(out), "--eval-data", "packaged", "--eval-limit", "200", "--json"]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    for key in ("ann_accuracy", "snn_accuracy", "binary_fraction", "size_ratio", "layers", "stages"):
        assert key in document, key
    assert list(document["snn_accuracy"]) == ["1"] and document["timesteps"] == 1
    assert set(document["stages"]) == {"load", "synth", "convert", "privatize", "binarize", "export", "profile", "eval"}
    # --precision auto resolved for this machine, and both training stages recorded it in the manifest.
    assert document["precision"] == resolve_precision("auto")
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert stages["privatize"]["config"]["privatize"]["train"]["precision"] == document["precision"]
    assert stages["binarize"]["config"]["binarize"]["train"]["precision"] == document["precision"]
    # And which code trained the one-timestep neurons: the compiled kernel wherever a C compiler is.
    expected = "compiled" if neuron_kernel.library() is not None else "pytorch"
    assert stages["privatize"]["metrics"]["neuron_kernel"] == stages["binarize"]["metrics"]["neuron_kernel"] == expected
    layers = document["layers"]
    assert all(layer["weight_format"] in ("int8", "binary") for layer in layers.values())
    assert document["binary_fraction"] == pytest.approx(sum(l["weights"] for l in layers.values() if l["binarized"]) / sum(l["weights"] for l in layers.values()), abs=1e-4)
    assert document["size_ratio"] > 3  # int8 alone is ~4× smaller than fp32
    assert document["rekey"]["rekeyed"] and document["rekey"]["key"].startswith("secret")  # and every export below still agrees
    assert (out / "binary.pt").is_file() and (out / "private.pt").is_file()
    assert (out / "model.onnx").is_file() and (out / "c" / "esnn_model.c").is_file() and (out / "c" / "golden_logits.txt").is_file()
    assert document["export"]["targets"] == ["onnx", "c", "tflite", "nir"] and (out / "model.tflite").is_file() and (out / "model.nir").is_file() and document["export"]["c"]["arena_bytes"] > 0

    # Every exported artifact, run on real images: ONNX agrees with PyTorch, the C firmware equals the integer reference.
    result = runner.invoke(app, ["eval", str(out), "--data", "packaged", "--limit", "200", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    runtimes = json.loads(result.stdout)["runtimes"]
    assert set(runtimes) == {"pytorch", "integer_reference", "onnx", "c", "tflite", "nir"}
    assert runtimes["onnx"]["agreement"] >= 0.995 and runtimes["integer_reference"]["agreement"] >= 0.98
    assert runtimes["tflite"]["agreement"] >= 0.98 and runtimes["nir"]["agreement"] >= 0.995
    if "bit_exact" in runtimes["c"] or runtimes["c"]["images"]:
        assert runtimes["c"]["bit_exact"] and runtimes["c"]["images"] == 200


def test_export_command_writes_the_chosen_targets(tmp_path) -> None:
    build(TINY, tmp_path / "build")
    result = runner.invoke(app, ["export", str(tmp_path / "build"), "--targets", "c", "--out", str(tmp_path / "deploy"), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["targets"] == ["c"] and summary["model"].endswith("binary.pt")
    assert all(name.startswith("c/") for name in summary["files"]) and (tmp_path / "deploy" / "c" / "Makefile").is_file()
    assert not (tmp_path / "deploy" / "model.onnx").exists()
    bad = runner.invoke(app, ["export", str(tmp_path / "build"), "--targets", "c,vhdl", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and "unknown target 'vhdl'" in bad.stderr and not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--binary"], "--binary needs --private"),
        (["--private", "--budget", "huge"], "--budget 'huge'"),
        (["--private", "--coding", "morse"], "--coding 'morse'"),
        (["--private", "--device", "cuda:7"], "device"),
        (["--private", "--binary", "--size-ratio", "0.5"], "--size-ratio 0.5"),
    ],
)
def test_bad_build_options_are_one_line_errors(tmp_path, args, fragment) -> None:
    import torch

    if "cuda:7" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result = runner.invoke(app, ["build", "--out", str(tmp_path / "out"), "--count", "20", "--iterations", "2", *args])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(("synth", "calibrate", "bias"))]
    assert lines and lines[-1].startswith("error: ") and fragment in lines[-1], result.stderr


_FAULTS_SCRIPT = """
import resource, sys, torch
from edgesnn import pipeline
if sys.argv[1] == "keep":
    assert pipeline.keep_freed_memory()
torch.empty(64 << 18).fill_(1.0)  # 64 MiB once, so both runs start warm
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(64 << 18).fill_(1.0)  # 64 MiB, freed at once: above malloc's mmap threshold
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_reuses_large_blocks_instead_of_faulting_them_in_again():
    """Ten 64 MiB tensors allocated and freed in turn: by default each is a fresh mapping whose
    16,384 pages fault in one by one; with keep_freed_memory the pages stay mapped and are reused (measured: 163,850 against 16,384)."""
    page_faults = {}
    for mode in ("default", "keep"):
        run = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True)
        page_faults[mode] = int(run.stdout.split()[-1])
    pages = (64 << 20) // resource.getpagesize()
    # Measured 163,850 against 16,384, once 32,768 in a CI run: ten fresh mappings against one or two.
    assert page_faults["default"] > 8 * pages, page_faults
    assert page_faults["keep"] < 4 * pages, page_faults
