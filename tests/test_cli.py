"""The command line on real checkpoints and real images: JSON schema, resume, and one-line errors."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from edgesnn.cli import app
from edgesnn.zoo import ZOO

runner = CliRunner()
FIXTURES = Path(__file__).parent / "fixtures"


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_python_dash_m_works_and_help_teaches() -> None:
    done = subprocess.run([sys.executable, "-m", "edgesnn", "build", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for option in ("--eval-data", "--count", "--timesteps", "--threshold-mode", "--arch", "--trust-pickle", "--json"):
        assert option in done.stdout


def test_zoo_json_lists_trained_teachers() -> None:
    result = invoke("zoo", "--json")
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert {row["name"] for row in rows} == set(ZOO)
    for row in rows:
        assert row["trained"] and 0.85 < row["test_accuracy"] <= 1.0


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("build") / "out"
    result = invoke("build", "--out", str(out), "--count", "200", "--eval-data", "packaged", "--eval-limit", "200", "--eval-timesteps", "1,8,64", "--json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_build_writes_artifacts_and_documented_json(built) -> None:
    out, document = built
    for name in ("teacher.pt", "synthetic.npz", "synthetic.png", "snn.pt", "eval.json", "manifest.json"):
        assert (out / name).is_file(), name
    assert set(document["snn_accuracy"]) == {"1", "8", "64"}
    assert 0.0 <= document["snn_accuracy"]["1"] <= 1.0 and document["ann_accuracy"] > 0.85
    assert document["snn_accuracy"]["64"] > document["snn_accuracy"]["1"]
    assert document["synthetic"]["images"] == 200 and document["synthetic"]["method"] == "deepinversion"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["datasets_read_by_build"] == []
    for stage in ("load", "synth", "convert"):
        entry = manifest["stages"][stage]
        assert entry["outputs"] and entry["seconds"] >= 0 and entry["peak_rss_mb"] > 0
    assert (out / "synthetic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_resumes_finished_stages(built) -> None:
    out, first = built
    result = invoke("build", "--out", str(out), "--count", "200", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert all(stage["resumed"] for stage in document["stages"].values())
    # A changed convert option recomputes convert only.
    result = invoke("build", "--out", str(out), "--count", "200", "--percentile", "99.5", "--json")
    stages = json.loads(result.stdout)["stages"]
    assert stages["load"]["resumed"] and stages["synth"]["resumed"] and not stages["convert"]["resumed"]


def test_eval_on_build_folder_and_snn_file(built) -> None:
    out, _ = built
    result = invoke("eval", str(out), "--data", "packaged", "--limit", "100", "--timesteps", "2,16", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert set(document["snn_accuracy"]) == {"2", "16"} and document["images"] == 100
    result = invoke("eval", str(out / "snn.pt"), "--data", "packaged", "--limit", "50", "--timesteps", "4", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["images"] == 50


def test_synth_and_convert_commands_chain(tmp_path: Path) -> None:
    result = invoke("synth", "fmnist_vgg", "--out", str(tmp_path), "--count", "40", "--iterations", "8", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == 40
    result = invoke("convert", str(tmp_path), "--out", str(tmp_path), "--per-layer", "--no-bias-correction", "--json")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "snn.pt").is_file()


def test_synth_takes_the_batchnorm_weighting(tmp_path: Path) -> None:
    from edgesnn.pipeline import read_synthetic

    result = invoke("synth", "fmnist_resnet8", "--out", str(tmp_path), "--count", "20", "--iterations", "4", "--bn-weight", "10", "--first-bn-weight", "1", "--json")
    assert result.exit_code == 0, result.output
    config = read_synthetic(tmp_path / "synthetic.npz").config
    assert [list(pair) for pair in config["bn_weightings"]] == [[10.0, 1.0]]  # one weighting for all, not the default mix
    result = invoke("synth", "fmnist_resnet8", "--out", str(tmp_path / "bad"), "--bn-weight", "-1")
    assert result.exit_code == 2 and not (tmp_path / "bad").exists()


# -- bad input: one line on stderr, exit 1, nothing written -------------------


def test_corrupt_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.pt"
    path.write_bytes(os.urandom(2048))
    result = invoke("build", str(path), "--arch", "fmnist_resnet8", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, str(path))
    assert not (tmp_path / "out").exists()


def test_wrong_architecture_lists_mismatched_keys(tmp_path: Path) -> None:
    path = tmp_path / "vgg.pt"
    torch.save(ZOO["fmnist_vgg"].factory().state_dict(), path)
    result = invoke("build", str(path), "--arch", "fmnist_resnet8", "--out", str(tmp_path / "out"))
    line = assert_one_line_error(result, "missing", "unexpected")
    assert "stem.0.weight" in line


def test_unsupported_op_is_named(tmp_path: Path) -> None:
    model_file = tmp_path / "sigmoid_net.py"
    model_file.write_text(
        "import torch.nn as nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 24 * 24, 10))\n"
    )
    checkpoint = tmp_path / "sigmoid.pt"
    import importlib.util

    spec = importlib.util.spec_from_file_location("sigmoid_net", model_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.save(module.make().state_dict(), checkpoint)
    result = invoke("build", str(checkpoint), "--arch", f"{model_file}:make", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "aten.sigmoid", "'3' (Sigmoid)", "not supported")
    assert not (tmp_path / "out").exists()


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp") / f"edgesnn-cli-marker-{os.getpid()}"


def test_malicious_pickle_is_refused_and_not_run(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    with path.open("wb") as handle:
        pickle.dump({"state_dict": _Payload()}, handle)
    MARKER.unlink(missing_ok=True)
    result = invoke("build", str(path), "--arch", "fmnist_resnet8", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "--trust-pickle")
    assert not MARKER.exists()


def test_missing_data_path(built, tmp_path: Path) -> None:
    out, _ = built
    result = invoke("eval", str(out), "--data", str(tmp_path / "nowhere"))
    assert_one_line_error(result, "nowhere", "no such file")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["build", "no_such_model_xyz", "--out", "x"], "no_such_model_xyz"),
        (["eval", "fmnist_resnet8", "--data", "packaged", "--timesteps", "1,zero"], "--timesteps"),
        (["eval", "fmnist_resnet8", "--data", "packaged", "--normalize", "0.5"], "--normalize"),
        (["build", "--input-shape", "1,28", "--out", "x"], "C,H,W"),
    ],
)
def test_other_bad_inputs(args: list[str], fragment: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(invoke(*args), fragment)


def test_unknown_precision_is_a_one_line_error(tmp_path) -> None:
    result = invoke("build", "--private", "--precision", "half", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "precision 'half' is unknown", "auto, fp32, bf16")
    assert not (tmp_path / "out").exists()


def test_usage_error_exits_2() -> None:
    result = invoke("build", "--no-such-option")
    assert result.exit_code == 2
