"""Integer lowering and C firmware: bit-exact with the integer reference on real Fashion-MNIST images."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgesnn.errors import ExportError
from edgesnn.export import compile_c, lower, run_c_harness, run_reference
from edgesnn.export.program import deployment_model, images_from_pixels
from edgesnn.export.to_c import c_sources, mixed_tables, pack_signs, weight_bytes
from edgesnn.privatize import snn_logits

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None or shutil.which("make") is None, reason="no C compiler")


@pytest.fixture(scope="module", params=["binary_resnet", "vgg", "lambda_resnet"])
def exported(request, tmp_path_factory, binarized, vgg_one_step, lambda_resnet_one_step):
    """(model, program, folder with the generated C sources) for three graphs: residual adds with
    binary layers, pooling + flatten + linear, and a channel-padding shortcut."""
    model = {"binary_resnet": binarized, "vgg": vgg_one_step, "lambda_resnet": lambda_resnet_one_step}[request.param]
    program = lower(model)
    folder = tmp_path_factory.mktemp(f"c_{request.param}")
    for name, data in c_sources(program, "edgesnn tests").items():
        (folder / name).write_bytes(data)
    return request.param, model, program, folder


@needs_compiler
def test_c_firmware_is_bit_exact_with_the_integer_reference(exported, pixels, tmp_path) -> None:
    name, model, program, folder = exported
    executable = _compile(folder, tmp_path)
    found = run_c_harness(executable, pixels)
    expected = run_reference(program, pixels).numpy()
    assert found.shape == expected.shape == (len(pixels), 10)
    assert np.array_equal(found, expected), f"{name}: {(found != expected).any(1).sum()} of {len(pixels)} images differ"


def _compile(folder: Path, build_dir: Path) -> Path:
    """compile_c expects a bundle (folder/c); the generated folder here is the c folder itself."""
    bundle = build_dir / "bundle"
    shutil.copytree(folder, bundle / "c")
    return compile_c(bundle, build_dir / "build")


def test_integer_reference_predicts_what_the_float_model_predicts(exported, pixels) -> None:
    name, model, program, _ = exported
    deployed = deployment_model(model)  # the binarized model as it is; the others with int8 weights
    float_predictions = snn_logits(deployed, images_from_pixels(pixels, model.normalize), 1).argmax(1)
    integer_predictions = run_reference(program, pixels).argmax(1)
    agreement = float((float_predictions == integer_predictions).float().mean())
    # Only rounding separates them: float32 sums, the int16 image, the multipliers of residual adds.
    assert agreement >= 0.99, f"{name}: {agreement:.3f}"


def test_binary_layers_take_one_bit_per_weight(binarized) -> None:
    program = lower(binarized)
    binary_ops = [op for op in program.ops if op.kind == "conv" and op.attrs["binary"]]
    binary_nodes = [node for node in binarized.graph.weighted() if node.attrs["weight_format"] == "binary"]
    assert len(binary_ops) == len(binary_nodes) > 0
    source = c_sources(program, "edgesnn tests")["esnn_model.c"].decode()
    for op in binary_ops:
        out_channels, in_channels, kernel_h, kernel_w = op.arrays["weight"].shape
        words = out_channels * kernel_h * kernel_w * -(-in_channels // 32)
        index = program.ops.index(op)
        assert re.search(rf"static const uint32_t op{index}_weight\[{words}\]", source), op.source
        # The packed words hold every sign: unpacking gives the weights back.
        packed = pack_signs(op.arrays["weight"])
        bits = (packed[..., None] >> np.arange(32, dtype=np.uint32)) & 1
        unpacked = bits.reshape(out_channels, kernel_h, kernel_w, -1)[..., :in_channels].transpose(0, 3, 1, 2)
        assert np.array_equal(np.where(unpacked == 1, 1, -1), op.arrays["weight"])
    # Constants: a binary layer costs 1/8 of its int8 size (plus nothing else per weight).
    binary_weights = sum(node.params["weight"].numel() for node in binary_nodes)
    int8_weights = sum(node.params["weight"].numel() for node in binarized.graph.weighted() if node.attrs["weight_format"] == "int8")
    assert weight_bytes(program) < int8_weights + binary_weights / 8 * 1.5 + 4096


def test_a_mixed_layer_keeps_its_binary_channels_at_one_bit(mixed) -> None:
    program = lower(mixed)
    (op,) = [op for op in program.ops if op.kind == "conv" and op.attrs["binary_rows"]]
    node = mixed.graph[op.source]
    assert op.attrs["binary_rows"] == node.attrs["binary_rows"] and not op.attrs["binary"]
    codes = op.arrays["weight"]
    binary = op.attrs["binary_rows"]
    assert set(np.unique(codes[binary])) == {-1, 1} and np.abs(codes[[o for o in range(len(codes)) if o not in binary]]).max() == 127
    packed, int8, rows = mixed_tables(codes, binary)
    # Every output channel finds its weights again: binary rows in the packed signs, the others in the int8 columns.
    bits = (packed[..., None] >> np.arange(32, dtype=np.uint32)) & 1
    out_channels, in_channels, kernel_h, kernel_w = codes.shape
    unpacked = np.where(bits.reshape(len(binary), kernel_h, kernel_w, -1)[..., :in_channels].transpose(0, 3, 1, 2) == 1, 1, -1)
    for o in range(out_channels):
        expected = codes[o]
        found = int8[..., rows[o]].transpose(2, 0, 1) if rows[o] >= 0 else unpacked[-rows[o] - 1]
        assert np.array_equal(found, expected), o
    source = c_sources(program, "edgesnn tests")["esnn_model.c"].decode()
    index = program.ops.index(op)
    assert re.search(rf"static const uint32_t op{index}_weight_binary\[{packed.size}\]", source)
    assert f"esnn_conv_mixed_bits(" in source
    # The binary channels cost 1/8 of a byte per weight in the C tables.
    assert weight_bytes(program) < weight_bytes(lower(replace(mixed, graph=_as_int8(mixed.graph, op.source))))


def _as_int8(graph, name):
    graph = graph.copy()
    graph[name].attrs["weight_format"] = "int8"
    graph[name].attrs.pop("binary_rows")
    return graph


def test_lowering_refuses_what_it_cannot_express(binarized, one_step) -> None:
    with pytest.raises(ExportError, match="one-timestep"):
        lower(replace(one_step, timesteps=4))
    old_style = replace(binarized, amplitudes={})  # binarized before amplitudes were shared per layer
    with pytest.raises(ExportError, match="per-channel spike amplitudes"):
        lower(old_style)


@needs_compiler
def test_generated_c_builds_with_werror_and_checks_golden_logits(tmp_path, binarized, pixels) -> None:
    program = lower(binarized)
    folder = tmp_path / "c"
    folder.mkdir()
    for name, data in c_sources(program, "edgesnn tests").items():
        (folder / name).write_bytes(data)
    (folder / "golden_images.bin").write_bytes(pixels[:8].numpy().tobytes())
    logits = run_reference(program, pixels[:8])
    (folder / "golden_logits.txt").write_text("".join(" ".join(str(int(v)) for v in row) + "\n" for row in logits.tolist()))
    result = subprocess.run(["make", "-s", "-C", str(folder), "check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "bit-exact" in result.stdout
    assert "-Werror" in (folder / "Makefile").read_text() and "-std=c99" in (folder / "Makefile").read_text()
    header = (folder / "esnn_model.h").read_text()
    assert header.startswith("/* Generated by edgesnn tests. Do not edit. */")
