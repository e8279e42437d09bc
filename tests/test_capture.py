"""Capture: every supported op family is exercised by a model, and refusals name the node."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgesnn.artifacts import LoadedModel
from edgesnn.capture import CAPTURE_TABLE, capture, supported_ops
from edgesnn.errors import CaptureError
from edgesnn.graph import Graph, GraphNetwork, fold_batchnorm
from edgesnn.zoo import ZOO

FIXTURES = Path(__file__).parent / "fixtures"


def _randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so BN folding is really tested."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.running_mean.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
    return model.eval()


class Lambda(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


class Functional(nn.Module):
    """Wrap a forward function with a conv in front, so every op sees a 4-D feature map."""

    def __init__(self, function, channels: int = 4, head_features: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.function = function
        self.head = nn.LazyLinear(3) if head_features is None else nn.Linear(head_features, 3)

    def forward(self, x):
        out = self.function(torch.relu(self.conv(x)))
        return self.head(torch.flatten(out, 1))


def _models() -> dict[str, nn.Module]:
    """One small model per op family of the capture table (key: a descriptive name)."""
    conv_bn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    return {
        "conv_bn_relu_module_linear": conv_bn,
        "conv_padding_same_strided_dilated_grouped": Functional(lambda x: F.conv2d(x, torch.ones(4, 2, 3, 3) * 0.1, None, 1, "same", 1, 2)),
        "decomposed_linear_addmm": Functional(lambda x: x, head_features=4 * 8 * 8),
        "batchnorm1d_after_linear": nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)),
        "relu_functional_inplace": Functional(lambda x: F.relu(x * 1.0 if False else x, inplace=True)),
        "relu6_module": nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU6(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)),
        "hardtanh_zero_based": nn.Sequential(nn.Conv2d(1, 4, 3), nn.Hardtanh(0.0, 2.0), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)),
        "clamp_and_clamp_min": Functional(lambda x: torch.clamp(torch.clamp_min(x, 0.0), 0.0, 3.0)),
        "avgpool_maxpool": Functional(lambda x: F.max_pool2d(F.avg_pool2d(x, 2), 2, 2)),
        "adaptive_avgpool_mean": Functional(lambda x: F.adaptive_avg_pool2d(x, 2) + x.mean((2, 3), keepdim=True)),
        "view_reshape_squeeze": Functional(lambda x: F.adaptive_avg_pool2d(x, 1).squeeze(-1).squeeze(-1).unsqueeze(1).reshape(x.size(0), -1).view(x.size(0), 4, 1, 1)),
        "residual_add_and_cat": Functional(lambda x: torch.cat([x + torch.relu(x), x], dim=1)),
        "lambda_pad_shortcut": Functional(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2), "constant", 0)),
        "dropout_identity_clone": nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Dropout(0.5), nn.Identity(), Lambda(lambda x: x.clone().contiguous()), nn.Flatten(), nn.Linear(144, 3)),
    }


MODELS = _models()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_captured_graph_matches_model_and_folding_keeps_outputs(name: str) -> None:
    model = _randomize_batchnorm(MODELS[name])
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(x)  # materialise lazy layers
        expected = model(x)
    teacher = capture(LoadedModel(model, (1, 8, 8), None, None, name, "zoo"))
    with torch.no_grad():
        found = GraphNetwork(teacher.graph)(x)
        folded = GraphNetwork(fold_batchnorm(teacher.graph))(x)
    assert torch.allclose(found, expected, atol=1e-5)
    assert torch.allclose(folded, expected, atol=1e-4)
    assert teacher.num_classes == 3
    assert not fold_batchnorm(teacher.graph).of_op("batchnorm") or name == "batchnorm1d_after_linear_unfoldable"


def test_every_translator_is_exercised_by_a_model() -> None:
    """A new op in CAPTURE_TABLE needs a model above that uses it."""
    used = set()
    for name, model in MODELS.items():
        model = _randomize_batchnorm(model)
        with torch.no_grad():
            model(torch.zeros(2, 1, 8, 8))
        program = torch.export.export(model, (torch.zeros(2, 1, 8, 8),), strict=False)
        used |= {node.target for node in program.graph.nodes if node.op == "call_function"}
        if name in ("decomposed_linear_addmm", "conv_bn_relu_module_linear"):
            used |= {node.target for node in program.run_decompositions().graph.nodes if node.op == "call_function"}
    translators = {translator for target, translator in CAPTURE_TABLE.items() if target in used}
    assert translators == set(CAPTURE_TABLE.values()), "translators without a test model: " + ", ".join(
        sorted({t.__name__ for t in set(CAPTURE_TABLE.values()) - translators})
    )


def test_decomposed_export_maps_onto_the_same_graph() -> None:
    model = _randomize_batchnorm(ZOO["fmnist_vgg"].factory())
    program = torch.export.export(model, (torch.randn(2, 1, 28, 28),), strict=False).run_decompositions()
    teacher = capture(LoadedModel(program.module(), (1, 28, 28), None, None, "decomposed", "export"))
    assert [n.op for n in teacher.graph.weighted()] == ["conv"] * 5 + ["linear"]


@pytest.mark.parametrize("factory", ["resnet8", "resnet20"])
def test_cifar_resnet_with_lambda_pad_shortcut(factory: str) -> None:
    spec = importlib.util.spec_from_file_location("resnet_lambda_fixture", FIXTURES / "resnet_lambda.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = _randomize_batchnorm(getattr(module, factory)())
    channels = model.conv1.in_channels
    teacher = capture(LoadedModel(model, (channels, 32, 32), None, None, factory, "state_dict"))
    ops = [node.op for node in teacher.graph.nodes]
    assert ops.count("pad") == 2 and ops.count("add") == len(teacher.graph.of_op("add"))
    assert len(teacher.graph.neurons()) == 1 + 2 * (3 if factory == "resnet8" else 9)


def _refusal(model: nn.Module, shape=(1, 8, 8)) -> str:
    with torch.no_grad():
        model(torch.zeros(2, *shape))  # materialise lazy layers; these models all run eagerly
    with pytest.raises(CaptureError) as caught:
        capture(LoadedModel(model.eval(), shape, None, None, "bad", "zoo"))
    message = str(caught.value)
    assert "\n" not in message and message.startswith("capture: ")
    return message


def test_unsupported_op_is_named_with_module_and_source_line() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(144, 3))
    message = _refusal(model)
    assert "aten.sigmoid" in message and "'1' (Sigmoid)" in message and "not supported" in message


def test_unsupported_functional_op_points_at_the_users_line() -> None:
    model = Functional(lambda x: torch.tanh(x))
    message = _refusal(model)
    assert "aten.tanh" in message and "test_capture.py:" in message


@pytest.mark.parametrize(
    "function, expected",
    [
        (lambda x: F.pad(x, (-1, -1, 0, 0)), "negative padding"),
        (lambda x: F.pad(x, (1, 1, 1, 1), value=1.0), "only zero padding"),
        (lambda x: F.pad(x, (1, 1, 1, 1), mode="reflect"), "'reflect' padding"),
        (lambda x: F.hardtanh(x), "not a clipped ReLU"),
        (lambda x: torch.clamp(x, -1.0, 1.0), "lower bound must be 0"),
        (lambda x: x + 1.0, "not the addition of a constant"),
        (lambda x: x.mean(1, keepdim=True), "mean over dimensions [1]"),
    ],
)
def test_misused_supported_ops_are_refused(function, expected: str) -> None:
    assert expected in _refusal(Functional(function))


def test_model_without_relu_is_refused() -> None:
    assert "no ReLU" in _refusal(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)))


def test_graph_serialisation_round_trip_is_weights_only_safe(tmp_path: Path) -> None:
    teacher = capture(LoadedModel(_randomize_batchnorm(ZOO["fmnist_resnet8"].factory()), (1, 28, 28), None, None, "r", "zoo"))
    path = tmp_path / "graph.pt"
    torch.save(teacher.graph.to_dict(), path)
    graph = Graph.from_dict(torch.load(path, weights_only=True))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(GraphNetwork(graph)(x), GraphNetwork(teacher.graph)(x))


def test_supported_ops_lists_the_table() -> None:
    names = supported_ops()
    for op in ("conv2d", "linear", "batch_norm", "relu", "avg_pool2d", "max_pool2d", "cat", "pad", "slice.Tensor"):
        assert op in names
