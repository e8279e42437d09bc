"""The compiled one-timestep neuron against the PyTorch graph it replaces, on currents of real Fashion-MNIST images."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from edgesnn import neuron_kernel
from edgesnn.privatize import TrainableIF, _CurrentMatching, _CurrentNorm, _StraightThrough

needs_kernel = pytest.mark.skipif(neuron_kernel.library() is None, reason="no C compiler: training takes the PyTorch graph")


@pytest.fixture(scope="module")
def currents(real_images, resnet_teacher) -> torch.Tensor:
    """The zoo ResNet's first convolution on 128 real images, channels-last: 128×C×28×28."""
    first = next(module for module in resnet_teacher.network.modules() if isinstance(module, torch.nn.Conv2d))
    with torch.no_grad():
        currents = F.conv2d(torch.from_numpy(real_images.images[:128]), first.weight, first.bias, first.stride, first.padding)
    return currents.contiguous(memory_format=torch.channels_last)


def _neuron(channels: int, norm: bool, amplitude: torch.Tensor | None, currents: torch.Tensor) -> TrainableIF:
    generator = torch.Generator().manual_seed(0)
    neuron = TrainableIF(currents.abs().mean((0, 2, 3))[:channels] + 0.1 * torch.rand(channels, generator=generator), 0.5, 1.0, amplitude=amplitude)
    if norm:
        neuron.norm = _CurrentNorm(channels).train()
        with torch.no_grad():
            neuron.norm.track(currents.mean((0, 2, 3))[:channels], currents.var((0, 2, 3))[:channels], 10)
            neuron.norm.weight.mul_(0.5 + torch.rand(channels, generator=generator))  # as training would have moved them
            neuron.norm.bias.add_(0.2 * torch.randn(channels, generator=generator))
    return neuron


def _run(neuron: TrainableIF, current: torch.Tensor, kernel: bool, monkeypatch) -> dict:
    """Spikes, input gradient, parameter gradients and running statistics of one training step."""
    neuron = copy.deepcopy(neuron)
    with monkeypatch.context() as patch:
        if not kernel:
            patch.setattr(neuron_kernel, "applies", lambda current: False)
        current = current.detach().clone().requires_grad_(True)
        spikes = neuron(current)
        # A loss's gradient, exact in bfloat16 so that both paths see the same one whatever their spikes' dtype.
        weights = torch.randn(spikes.shape, generator=torch.Generator().manual_seed(1)).bfloat16().to(spikes.dtype)
        (spikes.float() * weights.float()).sum().backward()
    return {
        "spikes": spikes.detach(),
        "input": current.grad.float(),
        "parameters": {name: parameter.grad.clone() for name, parameter in neuron.named_parameters()},
        "statistics": None if neuron.norm is None else (neuron.norm.running_mean.clone(), neuron.norm.running_var.clone()),
    }


def _relative(found: torch.Tensor, expected: torch.Tensor) -> float:
    return float((found.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-12))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("amplitude", [None, 0.8])  # θ as the spike's amplitude, or a trainable scalar
@pytest.mark.parametrize("dims", [4, 2])  # a conv's current, or a linear layer's
def test_fused_neuron_trains_what_the_pytorch_graph_trains(currents, dtype, norm, amplitude, dims, monkeypatch) -> None:
    current = currents if dims == 4 else currents.mean((2, 3))
    neuron = _neuron(current.shape[1], norm, None if amplitude is None else torch.tensor(amplitude), currents)
    current = current.to(dtype)
    assert neuron_kernel.applies(current)
    fused, graph = _run(neuron, current, True, monkeypatch), _run(neuron, current, False, monkeypatch)
    assert fused["spikes"].dtype == dtype and graph["spikes"].dtype == torch.float32
    assert fused["spikes"].is_contiguous(memory_format=torch.channels_last if dims == 4 else torch.contiguous_format)
    # Same spikes: v = I·s + h rounds once here, twice in the graph, so a value within an ulp of θ may flip.
    flipped = float(((fused["spikes"] != 0) != (graph["spikes"] != 0)).float().mean())
    assert flipped < 1e-4, flipped
    spiking = graph["spikes"] != 0
    assert 0.02 < float(spiking.float().mean()) < 0.98  # the comparison covers both outcomes
    # A bfloat16 current's gradient is rounded to bfloat16 by both; float32 sums differ only in their order.
    assert _relative(fused["input"], graph["input"]) < (1e-2 if dtype == torch.bfloat16 else 1e-4)
    for name, expected in graph["parameters"].items():
        assert _relative(fused["parameters"][name], expected) < 1e-3, name
    if norm:
        for found, expected in zip(fused["statistics"], graph["statistics"]):
            assert torch.allclose(found, expected, rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matching_distance_is_the_pytorch_expression(currents, dtype, monkeypatch) -> None:
    student = currents.to(dtype)
    generator = torch.Generator().manual_seed(2)
    reference = (currents + 0.3 * torch.randn(currents.shape, generator=generator)).contiguous(memory_format=torch.channels_last).to(dtype)
    assert neuron_kernel.applies_pair(student, reference)
    results = []
    for kernel in (True, False):
        with monkeypatch.context() as patch:
            if not kernel:
                patch.setattr(neuron_kernel, "applies_pair", lambda student, reference: False)
            found = student.clone().requires_grad_(True)
            loss = 3.0 * _CurrentMatching._term(found, reference)
            loss.backward()
        results.append((float(loss.detach()), found.grad))
    (fused_loss, fused_grad), (graph_loss, graph_grad) = results
    assert fused_loss == pytest.approx(graph_loss, rel=1e-5)
    assert fused_grad.dtype == dtype and _relative(fused_grad, graph_grad) < 1e-5


def test_pair_of_different_layouts_takes_the_pytorch_graph(currents) -> None:
    assert not neuron_kernel.applies_pair(currents, currents.contiguous())
    assert not neuron_kernel.applies(currents.contiguous())  # NCHW: not rows × channels
    assert not neuron_kernel.applies(currents.double())


def test_kernel_is_built_once_into_the_cache_and_can_be_switched_off(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    try:
        neuron_kernel.library.cache_clear()
        if neuron_kernel.library() is None:
            pytest.skip("no C compiler")
        built = list((tmp_path / "edgesnn").iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"  # no scratch folder left beside it
        stamp = built[0].stat().st_mtime_ns
        neuron_kernel.library.cache_clear()
        assert neuron_kernel.library() is not None and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
        monkeypatch.setenv("EDGESNN_NEURON_KERNEL", "python")
        neuron_kernel.library.cache_clear()
        assert neuron_kernel.library() is None
    finally:
        monkeypatch.undo()
        neuron_kernel.library.cache_clear()


def test_without_a_compiler_training_takes_the_pytorch_graph(tmp_path, monkeypatch, currents) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    try:
        neuron_kernel.library.cache_clear()
        assert neuron_kernel.library() is None and not neuron_kernel.applies(currents)
        neuron = _neuron(currents.shape[1], True, None, currents)
        spikes = neuron(currents.bfloat16())
        assert spikes.dtype == torch.float32  # the graph's float32 spikes
        assert not (tmp_path / "edgesnn").exists() or not any((tmp_path / "edgesnn").iterdir())
    finally:
        monkeypatch.undo()
        neuron_kernel.library.cache_clear()


def test_one_input_channel_weight_keeps_the_convolution_channels_last() -> None:
    # Contiguous in both layouts, such a kernel came out of the straight-through arithmetic with NCHW strides,
    # and the first convolution then wrote its output NCHW, which the neuron kernel cannot read.
    weight = torch.randn(8, 1, 3, 3).contiguous(memory_format=torch.channels_last).as_strided((8, 1, 3, 3), (9, 1, 3, 1))
    images = torch.randn(4, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    for kind in ("int8", "binary"):
        straight = _StraightThrough(kind)(weight)
        assert straight.stride() == weight.stride()
        assert F.conv2d(images, straight, padding=1).is_contiguous(memory_format=torch.channels_last), kind
