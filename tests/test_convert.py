"""Conversion: IF neuron dynamics, calibration modes, and ANN/SNN agreement on real images."""

from __future__ import annotations

import io

import pytest
import torch

from edgesnn.convert import ConvertConfig, IFNeuron, SpikingNetwork, calibrate_thresholds, convert, spiking_from_state, spiking_state
from edgesnn.errors import ArtifactError, ConvertError
from edgesnn.evaluate import evaluate
from edgesnn.graph import GraphNetwork, fold_batchnorm


def _run_neuron(current: torch.Tensor, theta: float, steps: int, initial: float = 0.5) -> torch.Tensor:
    neuron = IFNeuron(torch.tensor(theta), initial)
    neuron.timesteps, neuron.batch = steps, current.shape[0] if current.dim() and current.shape[0] else 1
    return neuron(current).reshape(steps, *current.shape)


def test_if_neuron_rate_is_clipped_relu_quantised_to_one_over_t() -> None:
    current = torch.tensor([-0.3, 0.0, 0.1, 0.26, 0.5, 0.99, 1.0, 2.5])
    out = _run_neuron(current, 1.0, 100)
    assert set(out.unique().tolist()) <= {0.0, 1.0}  # spikes carry the amplitude θ
    rate = out.mean(0)
    expected = current.clamp(0, 1)
    assert torch.all((rate - expected).abs() <= 1 / 100 + 1e-6)


def test_soft_reset_and_initial_membrane_follow_the_equations() -> None:
    theta, steps = 2.0, 8
    current = torch.tensor([0.7, 1.3])
    out = _run_neuron(current, theta, steps, initial=0.5)
    membrane = torch.full_like(current, 0.5 * theta)
    for step in range(steps):
        membrane = membrane + current
        spikes = (membrane >= theta).float()
        membrane = membrane - theta * spikes
        assert torch.equal(out[step], spikes * theta)


def test_time_varying_current_equals_a_step_by_step_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    steps, batch = 6, 3
    current = torch.rand(steps * batch, 4, generator=generator) * 2 - 0.5
    neuron = IFNeuron(torch.tensor([0.5, 1.0, 1.5, 2.0]), 0.5)
    neuron.timesteps, neuron.batch = steps, batch
    out = neuron(current).reshape(steps, batch, 4)
    theta = torch.tensor([0.5, 1.0, 1.5, 2.0])
    membrane = 0.5 * theta.expand(batch, 4).clone()
    for step, chunk in enumerate(current.reshape(steps, batch, 4)):
        membrane = membrane + chunk
        spikes = (membrane >= theta).float()
        membrane = membrane - theta * spikes
        assert torch.allclose(out[step], spikes * theta)


def test_calibration_modes_and_per_channel_shapes(resnet_teacher, resnet_synthetic) -> None:
    graph = fold_batchnorm(resnet_teacher.graph)
    images = resnet_synthetic.images[:64]
    maximum = calibrate_thresholds(graph, images, ConvertConfig(threshold_mode="max", per_channel=False))
    robust = calibrate_thresholds(graph, images, ConvertConfig(percentile=99.0, per_channel=False))
    channels = calibrate_thresholds(graph, images, ConvertConfig(per_channel=True))
    network = GraphNetwork(graph)
    for node in graph.neurons():
        assert maximum[node.name].dim() == 0 and float(robust[node.name]) < float(maximum[node.name])
        assert channels[node.name].shape == (node.shape[0],)
        assert float(channels[node.name].max()) <= float(maximum[node.name]) + 1e-6
    # The max threshold is the largest ReLU output seen.
    outputs = {}
    hook = network.layer(graph.neurons()[0].name).register_forward_hook(lambda m, i, o: outputs.setdefault("o", o))
    with torch.no_grad():
        network(images)
    hook.remove()
    assert float(maximum[graph.neurons()[0].name]) == pytest.approx(float(outputs["o"].max()))


def _mean_output_gap(model, teacher_graph, images, steps: int) -> float:
    """Sum over neurons of |E[ANN ReLU output clipped at θ] − E[SNN output]| per channel."""
    from edgesnn.convert import _channel_means

    ann_means, snn_means = {}, {}
    ann = GraphNetwork(teacher_graph)
    snn = SpikingNetwork(model)
    handles = []
    for node in model.graph.neurons():
        handles.append(ann.layer(node.name).register_forward_hook(_channel_means(node.name, ann_means, 1, model.thresholds[node.name])))
        handles.append(snn.network.layer(node.name).register_forward_hook(_channel_means(node.name, snn_means, steps)))
    with torch.no_grad():
        ann(images)
        snn(images, steps)
    for handle in handles:
        handle.remove()
    return sum(float((ann_means[n] - snn_means[n]).abs().mean()) for n in ann_means)


def test_bias_correction_shrinks_the_mean_output_gap(resnet_teacher, resnet_synthetic) -> None:
    images = resnet_synthetic.images[:64]
    plain = convert(resnet_teacher, resnet_synthetic, ConvertConfig(timesteps=16, bias_correction=False))
    corrected = convert(resnet_teacher, resnet_synthetic, ConvertConfig(timesteps=16, bias_correction=True, bias_correction_images=64))
    folded = fold_batchnorm(resnet_teacher.graph)
    assert set(corrected.metrics["bias_shift_mean"]) == {n.name for n in folded.neurons()}
    assert _mean_output_gap(corrected, folded, images, 16) < 0.5 * _mean_output_gap(plain, folded, images, 16)


def _whole_simulation_bias_correction(graph, thresholds, initial_membrane, images, timesteps, batch_size):
    """The bias correction as first written: a whole simulation of the network for every neuron."""
    from edgesnn.artifacts import SpikingModel
    from edgesnn.convert import SAMPLES_PER_SIMULATION, _bias_owner, _channel_means

    graph = graph.copy()
    neurons = graph.neurons()
    ann_means = {}
    network = GraphNetwork(graph)
    handles = [network.layer(n.name).register_forward_hook(_channel_means(n.name, ann_means, 1, thresholds[n.name])) for n in neurons]
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            network(images[start : start + batch_size])
    for handle in handles:
        handle.remove()
    simulation_batch = max(1, min(batch_size, SAMPLES_PER_SIMULATION // timesteps))
    for neuron in neurons:
        owner = _bias_owner(graph, neuron)
        simulator = SpikingNetwork(SpikingModel(graph, thresholds, initial_membrane, timesteps, (0, 0, 0), 0, None))
        snn_means = {}
        handle = simulator.network.layer(neuron.name).register_forward_hook(_channel_means(neuron.name, snn_means, timesteps))
        with torch.no_grad():
            for start in range(0, len(images), simulation_batch):
                simulator(images[start : start + simulation_batch], timesteps)
        handle.remove()
        delta = (ann_means[neuron.name] - snn_means[neuron.name]) / len(images)
        owner.params["bias"] = owner.params["bias"] + delta
    return graph


@pytest.mark.parametrize("timesteps, count", [(4, 64), (64, 96)])  # one simulation call, and two (each run from the input)
def test_bias_correction_equals_a_whole_simulation_per_neuron(resnet_teacher, resnet_synthetic, timesteps, count) -> None:
    from edgesnn.convert import correct_biases

    graph = fold_batchnorm(resnet_teacher.graph)
    images = resnet_synthetic.images[:count]
    thresholds = calibrate_thresholds(graph, images, ConvertConfig())
    expected = _whole_simulation_bias_correction(graph, thresholds, 0.5, images, timesteps, 256)
    corrected, _ = correct_biases(graph, thresholds, 0.5, images, timesteps, 256)
    for mine, theirs in zip(corrected.nodes, expected.nodes):
        assert mine.params.keys() == theirs.params.keys()
        for key in mine.params:
            assert torch.equal(mine.params[key], theirs.params[key]), (mine.name, key)  # bit for bit


def test_snn_converges_to_the_ann_on_real_images(resnet_teacher, resnet_synthetic, real_images) -> None:
    """The zoo ResNet (residual adds, 1x1 shortcuts, global pooling) converted from synthetic calibration."""
    model = convert(resnet_teacher, resnet_synthetic, ConvertConfig(bias_correction_images=64))
    report = evaluate(resnet_teacher, model, real_images, [1, 4, 16, 64])
    assert report.ann_accuracy > 0.85
    accuracies = [report.snn_accuracy[t] for t in (1, 4, 16, 64)]
    assert accuracies[-1] > accuracies[0] + 0.3  # more timesteps, better rate code
    assert report.agreement[64] >= 0.9
    assert report.snn_accuracy[64] >= report.ann_accuracy - 0.04


def test_spiking_network_outputs_time_averaged_logits(resnet_teacher, resnet_synthetic, real_images) -> None:
    model = convert(resnet_teacher, resnet_synthetic, ConvertConfig(timesteps=8, bias_correction=False))
    x = torch.from_numpy(real_images.images[:4])
    with torch.no_grad():
        running = SpikingNetwork(model)(x)
        short = SpikingNetwork(model)(x, 3)
    assert running.shape == (8, 4, 10)
    assert torch.allclose(running[:3], short, atol=1e-5)  # causal: the first 3 steps do not see later ones


def test_spiking_state_round_trip_is_weights_only(resnet_teacher, resnet_synthetic, real_images) -> None:
    model = convert(resnet_teacher, resnet_synthetic, ConvertConfig(bias_correction=False))
    buffer = io.BytesIO()
    torch.save(spiking_state(model), buffer)
    buffer.seek(0)
    restored = spiking_from_state(torch.load(buffer, weights_only=True))
    x = torch.from_numpy(real_images.images[:8])
    with torch.no_grad():
        assert torch.equal(SpikingNetwork(model)(x, 4), SpikingNetwork(restored)(x, 4))
    state = spiking_state(model)
    name = next(iter(state["thresholds"]))
    state["thresholds"][name] = -state["thresholds"][name]
    with pytest.raises(ArtifactError, match="finite positive"):
        spiking_from_state(state)


@pytest.mark.parametrize(
    "config, message",
    [
        (ConvertConfig(threshold_mode="mean"), "threshold mode 'mean' is unknown"),
        (ConvertConfig(percentile=0), "percentile"),
        (ConvertConfig(timesteps=0), "timesteps"),
        (ConvertConfig(initial_membrane=1.5), "initial membrane"),
    ],
)
def test_bad_convert_configs(resnet_teacher, resnet_synthetic, config, message: str) -> None:
    with pytest.raises(ConvertError, match=message):
        convert(resnet_teacher, resnet_synthetic, config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("amplitude", [None, 0.37], ids=["theta", "amplitude"])
def test_one_step_neuron_is_the_loop_at_t1(real_images, resnet_teacher, dtype, amplitude) -> None:
    """T=1 takes a path of its own (a·[θ·m₀ + I ≥ θ]); it must round as the T-step loop does, and keep channels-last."""
    first = next(module for module in resnet_teacher.network.modules() if isinstance(module, torch.nn.Conv2d))
    with torch.no_grad():
        current = torch.nn.functional.conv2d(torch.from_numpy(real_images.images[:64]), first.weight, first.bias, first.stride, first.padding)
    theta = current.abs().mean((0, 2, 3)) + 0.05
    edge = (theta - theta * 0.5).reshape(1, -1, 1, 1)
    current[:4] = edge  # exactly where v = θ
    current[4:8] = torch.nextafter(edge, torch.zeros(())).expand(4, *current.shape[1:])  # one ulp below: rounding decides
    current = current.to(dtype).contiguous(memory_format=torch.channels_last)
    neuron = IFNeuron(theta, 0.5, None if amplitude is None else torch.tensor(amplitude))
    neuron.timesteps, neuron.batch = 1, len(current)
    fast = neuron(current)
    # The loop's arithmetic for one step: v ← θ·m₀; v ← v + I; s = [v ≥ θ]; out = a·s.
    column = theta.reshape(-1, 1, 1)
    membrane = torch.ones_like(current) * column * 0.5
    membrane.add_(current)
    expected = torch.empty_like(current)
    torch.mul(membrane >= column, column if amplitude is None else torch.tensor(amplitude), out=expected)
    assert torch.equal(fast, expected) and fast.dtype == dtype
    assert 0 < int((fast > 0).sum()) < fast.numel()
    assert fast.is_contiguous(memory_format=torch.channels_last)
