"""ONNX export: the file onnxruntime runs computes what the PyTorch simulator computes.

Models: the zoo ResNet converted at T=1 (stateless export) and at T=4 (step
export), the zoo VGG converted at T=1, and a small hand-made graph that holds
every op of ``edgesnn.graph.OPS``. Reference: ``SpikingNetwork`` /
``snn_logits`` on the 500 real Fashion-MNIST test images.

Tolerance: predictions (argmax) agree on at least 99.8% of the images, and
where they agree the logits differ by at most 1e-3 of the logit scale
(max |logit| of the reference). Convolutions sum in a different order in
onnxruntime, so a current that lies within rounding of a threshold may spike
in one runtime and not the other; that is the only allowed difference.
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from edgesnn.artifacts import SpikingModel
from edgesnn.convert import ConvertConfig, SpikingNetwork, convert
from edgesnn.errors import ExportError
from edgesnn.export.to_onnx import OPSET, initial_state, membrane_input, membrane_output, onnx_bytes, onnx_metadata, run_onnx
from edgesnn.graph import OPS, Graph, Node
from edgesnn.privatize import snn_logits

MODELS = ("resnet T=1", "vgg T=1", "resnet T=4")
AGREEMENT = 0.998  # least share of images on which ONNX and the simulator predict the same class
LOGIT_TOLERANCE = 1e-3  # largest logit difference where predictions agree, as a share of max |logit|


@pytest.fixture(scope="module")
def models(resnet_teacher, resnet_synthetic) -> dict[str, SpikingModel]:
    from edgesnn.pipeline import load_teacher
    from edgesnn.synth import SynthConfig, synthesize

    vgg = load_teacher("fmnist_vgg")
    return {
        "resnet T=1": convert(resnet_teacher, resnet_synthetic, ConvertConfig(timesteps=1)),
        "vgg T=1": convert(vgg, synthesize(vgg, SynthConfig(count=64, seed=0)), ConvertConfig(timesteps=1)),
        "resnet T=4": convert(resnet_teacher, resnet_synthetic, ConvertConfig(timesteps=4)),
    }


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory) -> tuple[dict[str, bytes], list[str]]:
    """Each model exported once, from an empty working directory; returns the files and what the directory holds after."""
    workdir = tmp_path_factory.mktemp("export")
    previous = os.getcwd()
    os.chdir(workdir)
    try:
        exported = {name: onnx_bytes(model) for name, model in models.items()}
    finally:
        os.chdir(previous)
    return exported, sorted(os.listdir(workdir))


@pytest.fixture(scope="module")
def references(models, real_images) -> dict[str, np.ndarray]:
    """The simulator's logits on the real images, each model at its own T."""
    images = torch.from_numpy(real_images.images)
    return {name: snn_logits(model, images, model.timesteps).numpy() for name, model in models.items()}


@pytest.fixture(scope="module")
def onnx_logits(exports, real_images) -> dict[str, np.ndarray]:
    return {name: run_onnx(data, real_images.images) for name, data in exports[0].items()}


def assert_equivalent(found: np.ndarray, reference: np.ndarray) -> None:
    """Predictions agree on ≥ AGREEMENT of the rows; where they agree, logits within LOGIT_TOLERANCE of the scale."""
    assert found.shape == reference.shape
    same = found.argmax(1) == reference.argmax(1)
    assert same.mean() >= AGREEMENT, f"predictions agree on {same.mean():.2%} of the images"
    scale = float(np.abs(reference).max())
    difference = float(np.abs(found - reference)[same].max(initial=0.0))
    assert difference <= LOGIT_TOLERANCE * scale, f"logits differ by {difference:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("name", MODELS)
def test_export_is_one_checked_file(name, models, exports) -> None:
    data = exports[0][name]
    proto = onnx.load_from_string(data)
    onnx.checker.check_model(proto, full_check=True)
    assert [entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")] == [OPSET]
    # Weights live in the file: no initializer points at external data, and no file was written beside it.
    assert all(tensor.data_location != onnx.TensorProto.EXTERNAL and not tensor.external_data for tensor in proto.graph.initializer)
    assert exports[1] == []
    model = models[name]
    neurons = [node.name for node in model.graph.neurons()]
    inputs = [value.name for value in proto.graph.input]
    outputs = [value.name for value in proto.graph.output]
    if model.timesteps == 1:
        assert (inputs, outputs) == (["images"], ["logits"])
    else:
        assert inputs == ["images", *(membrane_input(neuron) for neuron in neurons)]
        assert outputs == ["logits_step", *(membrane_output(neuron) for neuron in neurons)]
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.HasField("dim_value")
    metadata = onnx_metadata(data)
    assert metadata["layout"] == ("stateless" if model.timesteps == 1 else "step")
    assert metadata["timesteps"] == model.timesteps
    assert metadata["initial_membrane"] == model.initial_membrane
    assert metadata["normalize"] == {"mean": list(model.normalize[0]), "std": list(model.normalize[1])}
    assert list(metadata["thresholds"]) == neurons


@pytest.mark.parametrize("name", MODELS)
def test_onnxruntime_matches_the_simulator_on_real_images(name, onnx_logits, references) -> None:
    assert_equivalent(onnx_logits[name], references[name])


@pytest.mark.parametrize("name", MODELS)
def test_batch_dimension_is_dynamic(name, exports, onnx_logits, real_images) -> None:
    data = exports[0][name]
    images = real_images.images[:7]
    full = onnx_logits[name][:7]  # from batches of 256
    scale = float(np.abs(full).max())
    for batch in (1, 7):
        np.testing.assert_allclose(run_onnx(data, images, batch=batch), full, rtol=0, atol=1e-5 * scale)


def test_step_model_reproduces_every_timestep_of_the_simulator(models, exports, real_images) -> None:
    """Driven by hand as its docstring says: membranes from v₀·θ, the same image each step, logits averaged."""
    model, data = models["resnet T=4"], exports[0]["resnet T=4"]
    images = real_images.images[:128]
    with torch.no_grad():
        reference = SpikingNetwork(model)(torch.from_numpy(images), model.timesteps).numpy()  # T×N×classes running means
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # as run_onnx: the same kernels, so the same rounding
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    neurons = [node.name for node in model.graph.neurons()]
    state = initial_state(model, len(images))
    total = np.zeros_like(reference[0])
    for step in range(model.timesteps):
        logits, *after = session.run(["logits_step", *map(membrane_output, neurons)], {"images": images, **state})
        state = {membrane_input(neuron): membrane for neuron, membrane in zip(neurons, after)}
        total += logits
        assert_equivalent(total / (step + 1), reference[step])
    # run_onnx starts from the metadata's thresholds: the same membranes, hence the same logits.
    np.testing.assert_array_equal(run_onnx(data, images), total / np.float32(model.timesteps))
    # Fewer steps than exported: the simulation is causal, so T=2 is the running mean after two steps.
    assert_equivalent(run_onnx(data, images, timesteps=2), reference[1])


def test_initial_state_is_v0_times_threshold(models) -> None:
    model = models["resnet T=4"]
    state = initial_state(model, 3)
    for node in model.graph.neurons():
        membrane = state[membrane_input(node.name)]
        assert membrane.shape == (3, *node.shape) and membrane.dtype == np.float32
        expected = (model.thresholds[node.name] * model.initial_membrane).numpy()
        np.testing.assert_array_equal(membrane[2, :, 0, 0], expected)


def every_op_model(timesteps: int) -> SpikingModel:
    """A small random network that uses every op of ``OPS`` once or more, neurons on 3-D and 1-D values."""
    generator = torch.Generator().manual_seed(0)

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.5

    def conv(name: str, source: str, channels: int, out: int, kernel: int, shape: tuple[int, ...]) -> Node:
        attrs = {"stride": (1, 1), "padding": (kernel // 2, kernel // 2), "dilation": (1, 1), "groups": 1}
        return Node(name, "conv", (source,), attrs, {"weight": random(out, channels, kernel, kernel), "bias": random(out)}, shape)

    batchnorm = {"running_mean": random(4), "running_var": random(4).abs() + 0.5, "weight": random(4) + 1, "bias": random(4)}
    nodes = [
        Node("input", "input", (), {}, {}, (2, 8, 8)),
        conv("conv1", "input", 2, 4, 3, (4, 8, 8)),
        Node("bn", "batchnorm", ("conv1",), {"eps": 1e-5}, batchnorm, (4, 8, 8)),
        Node("relu1", "relu", ("bn",), {}, {}, (4, 8, 8)),
        Node("pad", "pad", ("relu1",), {"pad": (1, 1, 1, 1)}, {}, (4, 10, 10)),
        Node("maxpool", "maxpool", ("pad",), {"kernel": (2, 2), "stride": (2, 2), "padding": (0, 0), "dilation": (1, 1), "ceil_mode": False}, {}, (4, 5, 5)),
        conv("conv2", "maxpool", 4, 4, 3, (4, 5, 5)),
        Node("relu2", "relu", ("conv2",), {}, {}, (4, 5, 5)),
        Node("slice", "slice", ("relu2",), {"dim": 1, "start": 0, "end": 2, "step": 1}, {}, (2, 5, 5)),
        Node("identity", "identity", ("relu2",), {}, {}, (4, 5, 5)),
        Node("cat", "cat", ("slice", "identity"), {"dim": 1}, {}, (6, 5, 5)),
        conv("shortcut", "maxpool", 4, 6, 1, (6, 5, 5)),
        Node("add", "add", ("cat", "shortcut"), {}, {}, (6, 5, 5)),
        Node("avgpool", "avgpool", ("add",), {"kernel": (2, 2), "stride": (1, 1), "padding": (0, 0), "ceil_mode": False, "count_include_pad": True}, {}, (6, 4, 4)),
        Node("adaptive", "adaptive_avgpool", ("avgpool",), {"output_size": (2, 2)}, {}, (6, 2, 2)),
        Node("mean", "global_mean", ("adaptive",), {"keepdim": True}, {}, (6, 1, 1)),
        Node("flatten", "reshape", ("mean",), {}, {}, (6,)),
        Node("fc1", "linear", ("flatten",), {}, {"weight": random(8, 6), "bias": random(8)}, (8,)),
        Node("relu3", "relu", ("fc1",), {}, {}, (8,)),
        Node("fc2", "linear", ("relu3",), {}, {"weight": random(3, 8), "bias": random(3)}, (3,)),
    ]
    thresholds = {"relu1": random(4).abs() + 0.2, "relu2": torch.tensor(0.4), "relu3": random(8).abs() + 0.1}
    amplitudes = {"relu2": torch.tensor(0.7)}  # a spike amplitude that differs from θ
    return SpikingModel(Graph(nodes, "fc2"), thresholds, 0.5, timesteps, (2, 8, 8), 3, ((0.5, 0.5), (0.25, 0.25)), amplitudes=amplitudes)


@pytest.mark.parametrize("timesteps", [1, 3])
def test_every_graph_op_exports(timesteps) -> None:
    model = every_op_model(timesteps)
    assert {node.op for node in model.graph.nodes} == set(OPS), "every_op_model must use every op of OPS"
    images = torch.randn(64, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    data = onnx_bytes(model)
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    assert_equivalent(run_onnx(data, images.numpy(), batch=16), snn_logits(model, images, timesteps).numpy())


def test_stateless_export_of_a_multistep_model_is_refused(models) -> None:
    with pytest.raises(ExportError, match=r"^export: onnx: the model runs T=4 timesteps .*step=True"):
        onnx_bytes(models["resnet T=4"], step=False)


def test_missing_threshold_names_the_node(models) -> None:
    model = models["resnet T=1"]
    thresholds = dict(model.thresholds)
    del thresholds["layers.1.relu_3"]
    with pytest.raises(ExportError, match=r"node 'layers.1.relu_3' \(relu\) has no threshold"):
        onnx_bytes(replace(model, thresholds=thresholds))


def test_threshold_of_the_wrong_size_names_the_node(models) -> None:
    model = models["resnet T=1"]
    thresholds = {**model.thresholds, "stem.2.relu": torch.ones(3)}
    with pytest.raises(ExportError, match=r"node 'stem.2.relu' \(relu\) has a threshold of shape \(3,\), expected \(\) or \(16,\)"):
        onnx_bytes(replace(model, thresholds=thresholds))


def test_run_onnx_rejects_bad_inputs(exports) -> None:
    data = exports[0]["resnet T=1"]
    with pytest.raises(ExportError, match=r"images have shape \(2, 3, 28, 28\), the model expects N×1×28×28"):
        run_onnx(data, np.zeros((2, 3, 28, 28), np.float32))
    with pytest.raises(ExportError, match="not an ONNX model"):
        run_onnx(b"not a model", np.zeros((2, 1, 28, 28), np.float32))
    with pytest.raises(ExportError, match="stateless model computes T=1 only"):
        run_onnx(data, np.zeros((2, 1, 28, 28), np.float32), timesteps=4)
