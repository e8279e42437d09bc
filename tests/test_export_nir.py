"""NIR export: the written file, read back and run for one timestep, predicts what the PyTorch model predicts."""

from __future__ import annotations

import io
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch

from edgesnn.artifacts import SpikingModel
from edgesnn.errors import ExportError
from edgesnn.export.program import deployment_model, images_from_pixels
from edgesnn.export.to_nir import nir_bytes, read_nir, run_nir
from edgesnn.graph import Graph, Node
from edgesnn.privatize import snn_logits


@pytest.fixture(scope="module")
def written(binarized, vgg_one_step, mixed):
    models = {"binary_resnet": binarized, "vgg": vgg_one_step, "mixed_resnet": mixed}
    return {name: (model, nir_bytes(model, "edgesnn tests")) for name, model in models.items()}


@pytest.mark.parametrize("name", ["binary_resnet", "vgg"])
def test_nir_file_predicts_what_the_model_predicts(written, pixels, name) -> None:
    model, data = written[name]
    images = images_from_pixels(pixels, model.normalize)
    expected = snn_logits(deployment_model(model), images, 1)
    found = torch.from_numpy(run_nir(data, images.numpy(), batch=128))
    agreement = float((found.argmax(1) == expected.argmax(1)).float().mean())
    # float32 in both; NIR's v > v_threshold with the float32 just below the firing level equals the model's ≥.
    assert agreement >= 0.998, f"{name}: {agreement:.4f}"
    assert torch.allclose(found, expected, atol=1e-3, rtol=1e-4) or agreement == 1.0


def test_binary_layers_keep_their_format_in_node_metadata(written) -> None:
    model, data = written["binary_resnet"]
    graph = read_nir(data)
    formats = {node.name: node.attrs["weight_format"] for node in model.graph.weighted()}
    assert "binary" in formats.values() and "int8" in formats.values()
    for name, weight_format in formats.items():
        node = graph.nodes[name]
        metadata = node.metadata
        assert metadata["edgesnn_weight_format"] in (weight_format, weight_format.encode())
        assert int(metadata["edgesnn_weight_bits"]) == (1 if weight_format == "binary" else 8)
        rows = np.asarray(node.weight).reshape(node.weight.shape[0], -1)
        codes = rows / np.asarray(metadata["edgesnn_weight_scale"]).reshape(-1, 1)
        if weight_format == "binary":
            np.testing.assert_allclose(np.abs(codes), 1.0, rtol=1e-5)  # α·sign(W): two values per output channel
        else:
            np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
            assert np.abs(np.round(codes)).max() <= 127


def test_a_mixed_layer_has_its_bits_per_output_channel(written) -> None:
    model, data = written["mixed_resnet"]
    graph = read_nir(data)
    (node,) = [node for node in model.graph.weighted() if node.attrs["weight_format"] == "mixed"]
    metadata = graph.nodes[node.name].metadata
    assert metadata["edgesnn_weight_format"] in ("mixed", b"mixed")
    bits = np.asarray(metadata["edgesnn_weight_bits"])
    assert sorted(np.flatnonzero(bits == 1).tolist()) == node.attrs["binary_rows"] and set(bits.tolist()) == {1, 8}
    rows = np.asarray(graph.nodes[node.name].weight).reshape(len(bits), -1)
    codes = rows / np.asarray(metadata["edgesnn_weight_scale"]).reshape(-1, 1)
    np.testing.assert_allclose(np.abs(codes[bits == 1]), 1.0, rtol=1e-5)
    np.testing.assert_allclose(codes[bits == 8], np.round(codes[bits == 8]), atol=1e-3)


def test_thresholds_are_in_metadata_and_fire_at_the_model_level(written) -> None:
    model, data = written["vgg"]
    graph = read_nir(data)
    for node in model.graph.neurons():
        neuron = graph.nodes[node.name]
        level = (model.thresholds[node.name] * (1 - model.initial_membrane)).float().numpy().reshape(-1)
        np.testing.assert_allclose(np.asarray(neuron.metadata["edgesnn_fires_at"]), level, rtol=1e-6)
        # v_threshold is the float32 just below the level of each element's channel.
        below = np.asarray(neuron.v_threshold).reshape(len(level) if level.size > 1 else 1, -1)[:, 0]
        assert np.all(below < level) and np.all(np.nextafter(below, np.float32(np.inf)) == level.astype(np.float32))


def test_max_pooling_of_spikes_and_residual_adds_run_exactly() -> None:
    model = _pool_add_model()
    images = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    expected = snn_logits(deployment_model(model), images, 1)
    found = torch.from_numpy(run_nir(nir_bytes(model), images.numpy()))
    assert torch.equal(found.argmax(1), expected.argmax(1))
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=1e-5)


def test_unsupported_op_names_the_node(lambda_resnet_one_step) -> None:
    with pytest.raises(ExportError, match=r"^export: nir: node '[^']+' \((pad|slice|cat)\): NIR 1.0 has no node for this op"):
        nir_bytes(lambda_resnet_one_step)


def test_multistep_model_is_refused(written) -> None:
    model, _ = written["vgg"]
    with pytest.raises(ExportError, match="one-timestep"):
        nir_bytes(replace(model, timesteps=4))


def test_broken_file_is_a_one_line_error(written, tmp_path) -> None:
    _, data = written["vgg"]
    with pytest.raises(ExportError, match=r"^export: nir: cannot read the file") as caught:
        read_nir(data[: len(data) // 2])
    assert "\n" not in str(caught.value)
    # An edge to a node that does not exist: written with h5py, refused by the interpreter.
    buffer = io.BytesIO(data)
    with h5py.File(buffer, "r+") as file:
        edges = file["node"]["edges"][()]
        del file["node"]["edges"]
        file["node"].create_dataset("edges", data=np.concatenate([edges, np.array([[b"input", b"nowhere"]], dtype=edges.dtype)]))
    with pytest.raises(ExportError, match="nowhere"):
        run_nir(buffer.getvalue(), np.zeros((1, 1, 28, 28), dtype=np.float32))


def _pool_add_model() -> SpikingModel:
    """conv → neuron → max pool → (conv ‖ 1×1 conv) → add → neuron → avg pool → flatten → linear."""
    generator = torch.Generator().manual_seed(0)

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.5

    def conv(name: str, source: str, channels: int, out: int, kernel: int, shape: tuple[int, ...]) -> Node:
        attrs = {"stride": (1, 1), "padding": (kernel // 2, kernel // 2), "dilation": (1, 1), "groups": 1}
        return Node(name, "conv", (source,), attrs, {"weight": random(out, channels, kernel, kernel), "bias": random(out) * 0.2}, shape)

    nodes = [
        Node("input", "input", (), {}, {}, (1, 8, 8)),
        conv("conv1", "input", 1, 4, 3, (4, 8, 8)),
        Node("relu1", "relu", ("conv1",), {}, {}, (4, 8, 8)),
        Node("maxpool", "maxpool", ("relu1",), {"kernel": (2, 2), "stride": (2, 2), "padding": (0, 0), "dilation": (1, 1), "ceil_mode": False}, {}, (4, 4, 4)),
        conv("conv2", "maxpool", 4, 4, 3, (4, 4, 4)),
        conv("shortcut", "maxpool", 4, 4, 1, (4, 4, 4)),
        Node("add", "add", ("conv2", "shortcut"), {}, {}, (4, 4, 4)),
        Node("relu2", "relu", ("add",), {}, {}, (4, 4, 4)),
        Node("avgpool", "avgpool", ("relu2",), {"kernel": (2, 2), "stride": (2, 2), "padding": (0, 0), "ceil_mode": False, "count_include_pad": True}, {}, (4, 2, 2)),
        Node("flatten", "reshape", ("avgpool",), {}, {}, (16,)),
        Node("fc", "linear", ("flatten",), {}, {"weight": random(3, 16), "bias": random(3)}, (3,)),
    ]
    thresholds = {"relu1": random(4).abs() + 0.2, "relu2": torch.tensor(0.3)}
    return SpikingModel(Graph(nodes, "fc"), thresholds, 0.5, 1, (1, 8, 8), 3, None)


def test_all_targets_leave_out_nir_for_a_model_it_cannot_express(lambda_resnet_one_step, written) -> None:
    from edgesnn.export import parse_targets

    assert "nir" not in parse_targets("all", lambda_resnet_one_step)
    assert "nir" in parse_targets("all", written["vgg"][0])
    assert parse_targets("nir", lambda_resnet_one_step) == ["nir"]  # asked for by name: the export itself says why not
