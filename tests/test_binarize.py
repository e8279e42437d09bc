"""Adaptive binarization of a one-timestep SNN of the real zoo ResNet."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from edgesnn.binarize import BinarizeConfig, binarize, binary_share, channels_back, model_bytes, row_errors, shared_amplitudes, teacher_bytes_fp32, weight_error
from edgesnn.errors import BinarizeError
from edgesnn.privatize import TrainConfig, TrainingNetwork, _CurrentMatching, binary_rows, binary_weight, int8_weight, mixed_weight, snn_logits, train_spiking


def test_binary_layers_hold_exactly_two_values_per_output_channel(binarized) -> None:
    binary = [node for node in binarized.graph.weighted() if node.attrs["weight_format"] == "binary"]
    assert binary, "with a 100-point budget every candidate layer is binarized"
    for node in binary:
        weight = node.params["weight"].reshape(node.params["weight"].shape[0], -1)
        for row in weight:
            values = row.unique()
            assert len(values) <= 2 and torch.allclose(values.abs(), values.abs()[0].expand_as(values))


def test_other_layers_are_int8_and_first_and_last_stay_int8(binarized) -> None:
    weighted = binarized.graph.weighted()
    assert weighted[0].attrs["weight_format"] == "int8" and weighted[-1].attrs["weight_format"] == "int8"
    for node in weighted:
        if node.attrs["weight_format"] != "int8":
            continue
        weight = node.params["weight"].reshape(node.params["weight"].shape[0], -1)
        scale = weight.abs().amax(1, keepdim=True) / 127
        steps = weight / scale
        assert torch.allclose(steps, steps.round(), atol=1e-3)


def test_binarization_shrinks_the_model(one_step, binarized) -> None:
    assert binary_share(binarized) > 0.9  # every middle layer of the ResNet is binary
    assert model_bytes(binarized) * 8 < model_bytes(one_step)
    assert binarized.metrics["binarize"]["binary_fraction"] == pytest.approx(binary_share(binarized), abs=1e-4)


def test_layer_choice_follows_the_estimator(one_step, resnet_teacher, resnet_synthetic) -> None:
    # No fine-tuning and a storage target of 0.1%: exactly one layer is binarized, the one with the lowest measured drop.
    config = BinarizeConfig(max_loss=100.0, binary_fraction=0.001, step_steps=0, final_steps=0, holdout=0.2)
    model = binarize(one_step, resnet_teacher, resnet_synthetic, config)
    metrics = model.metrics["binarize"]
    candidates = {name: layer for name, layer in metrics["layers"].items() if "agreement_drop" in layer}
    chosen = [name for name, layer in metrics["layers"].items() if layer["weight_format"] == "binary"]
    best = min(candidates, key=lambda name: (candidates[name]["agreement_drop"], candidates[name]["weight_error"]))
    assert chosen == [best] == [metrics["steps"][0]["layer"]]


def test_binarize_starts_from_the_private_model_without_its_output_offsets(one_step, resnet_teacher, resnet_synthetic, real_images) -> None:
    from dataclasses import replace

    offsets = [0.5, -0.25, 0.0, 0.75, -1.0, 0.25, -0.5, 0.0, 0.125, 0.125]
    graph = one_step.graph.copy()
    graph[graph.output].params["bias"] = graph[graph.output].params["bias"] + torch.tensor(offsets)
    recorded = dict(one_step.metrics["privatize"], output_bias={"calibrated": True, "offsets": offsets})
    calibrated = replace(one_step, graph=graph, metrics=dict(one_step.metrics, privatize=recorded))
    config = BinarizeConfig(max_loss=100.0, binary_fraction=0.001, step_steps=0, final_steps=0, holdout=0.2, bias_noise=0.0)
    images = torch.from_numpy(real_images.images)

    def logits(model):
        return snn_logits(binarize(model, resnet_teacher, resnet_synthetic, config), images, 1)

    plain = logits(one_step)
    assert torch.allclose(logits(calibrated), plain, atol=1e-4)  # the recorded offsets are taken off first
    unrecorded = replace(calibrated, metrics=one_step.metrics)  # offsets nobody recorded are part of the model
    assert not torch.allclose(logits(unrecorded), plain, atol=0.1)


def test_a_step_over_budget_is_undone(one_step, resnet_teacher, resnet_synthetic) -> None:
    config = BinarizeConfig(max_loss=0.0, step_steps=0, final_steps=0, holdout=0.2)
    model = binarize(one_step, resnet_teacher, resnet_synthetic, config)
    steps = model.metrics["binarize"]["steps"]
    for step in steps:
        assert step["accepted"] == (step["agreement_after"] >= model.metrics["binarize"]["agreement_int8"])
    accepted = {step["layer"] for step in steps if step["accepted"]}
    assert accepted == {node.name for node in model.graph.weighted() if node.attrs["weight_format"] == "binary"}


def test_fine_tuning_that_makes_a_step_worse_is_not_kept(one_step, resnet_teacher, resnet_synthetic, monkeypatch) -> None:
    import dataclasses

    import edgesnn.binarize as stage

    train_spiking = stage.train_spiking

    def wrecking_trials(model, *args, **kwargs):
        trained, figures = train_spiking(model, *args, **kwargs)
        if args[8].startswith("bin"):  # the fine-tuning after a layer is binarized: flip every weight's sign
            graph = trained.graph.copy()
            for node in graph.weighted():
                node.params["weight"] = -node.params["weight"]
            trained = dataclasses.replace(trained, graph=graph)
        return trained, figures

    monkeypatch.setattr(stage, "train_spiking", wrecking_trials)
    # No output-bias calibration: the final agreement is then exactly what the untuned step reached.
    config = BinarizeConfig(max_loss=100.0, binary_fraction=0.001, step_steps=2, final_steps=0, holdout=0.2, bias_noise=0.0)
    metrics = binarize(one_step, resnet_teacher, resnet_synthetic, config).metrics["binarize"]
    assert metrics["output_bias"] == {"calibrated": False, "reason": "off"}
    (step,) = metrics["steps"]
    assert step["accepted"] and not step["fine_tuning_kept"]
    assert step["agreement_after"] == pytest.approx(metrics["agreement_int8"] - step["agreement_drop"] / 100, abs=1e-3)
    assert metrics["agreement_final"] == pytest.approx(step["agreement_after"], abs=1e-3)  # what the untuned step reached


def test_weight_error_of_binary_and_int8_quantizers() -> None:
    weight = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    assert weight_error(binary_weight(weight)) == pytest.approx(0.0, abs=1e-6)
    # For Gaussian weights the optimal α·sign keeps 2/π of the energy.
    assert weight_error(weight) == pytest.approx(1 - 2 / torch.pi, abs=0.08)
    assert torch.allclose(int8_weight(weight), weight, atol=float(weight.abs().max()) / 127)


@pytest.mark.parametrize(
    "config, fragment",
    [
        (BinarizeConfig(max_loss=-1), "max loss"),
        (BinarizeConfig(binary_fraction=1.5), "binary fraction"),
        (BinarizeConfig(holdout=0.0), "holdout"),
        (BinarizeConfig(current_weight=-1), "current weight"),
        (BinarizeConfig(bias_noise=float("nan")), "bias noise nan"),
        (BinarizeConfig(size_ratio=0.5), "size ratio 0.5"),
    ],
)
def test_bad_configuration_is_a_clear_error(one_step, resnet_teacher, resnet_synthetic, config, fragment) -> None:
    with pytest.raises(BinarizeError, match=fragment):
        binarize(one_step, resnet_teacher, resnet_synthetic, config)


def test_shared_amplitudes_change_no_spike(one_step, real_images) -> None:
    # The ResNet has identity shortcuts: there the add's other conv and the next thresholds absorb the factor.
    shared, exact = shared_amplitudes(one_step)
    assert exact and set(shared.amplitudes) == set(shared.thresholds)
    assert all(a.dim() == 0 for a in shared.amplitudes.values())
    images = torch.from_numpy(real_images.images[:200])
    before, after = snn_logits(one_step, images, 1), snn_logits(shared, images, 1)
    assert torch.allclose(before, after, atol=1e-4 * float(before.abs().max()))
    assert (before.argmax(1) == after.argmax(1)).all()


def test_binarized_model_has_one_amplitude_per_layer(binarized) -> None:
    assert set(binarized.amplitudes) == set(binarized.thresholds)
    assert binarized.metrics["binarize"]["shared_amplitudes_exact"]


def _current_mismatch(model, reference, images: torch.Tensor) -> float:
    """The current-matching loss of ``model`` against ``reference`` on ``images`` (no training)."""
    network = TrainingNetwork(model, 0.5)
    matching = _CurrentMatching(network, reference, 0.5, torch.device("cpu"), torch.contiguous_format)
    with torch.no_grad():
        network(images, 1, len(images))
        return float(matching.loss(images, 1, len(images)))


def test_current_matching_keeps_a_binarized_network_near_the_float_currents(one_step, resnet_teacher, resnet_synthetic, real_images) -> None:
    shared, _ = shared_amplitudes(one_step)
    images = torch.from_numpy(real_images.images[:200])
    assert _current_mismatch(shared, shared, images) == 0.0
    binary = shared.graph.weighted()[2].name  # one layer binary, the others int8
    formats = {node.name: ("binary" if node.name == binary else "int8") for node in shared.graph.weighted()}
    config = TrainConfig(batch_size=64, lr=2e-3)
    trained = {}
    for weight in (0.0, 10.0):
        trained[weight], _ = train_spiking(shared, resnet_teacher.network, resnet_synthetic.images, resnet_synthetic.labels, 1, 20, config, formats, reference=shared, reference_weight=weight)
    # On real images the trainer never saw, the matched network's currents are the closer ones (measured: 0.51 against
    # 0.77; the binary layer's own error keeps both far from 0 after 20 steps).
    assert _current_mismatch(trained[10.0], shared, images) < 0.9 * _current_mismatch(trained[0.0], shared, images)


def _assert_binary_and_int8_rows(node) -> None:
    """A mixed layer's binary_rows hold ±α each; every other row lies on its own int8 grid."""
    weight = node.params["weight"].reshape(node.params["weight"].shape[0], -1)
    binary = set(binary_rows(node))
    for index, row in enumerate(weight):
        if index in binary:
            values = row.unique()
            assert len(values) <= 2 and torch.allclose(values.abs(), values.abs()[0].expand_as(values))
        else:
            steps = row / (row.abs().max() / 127)
            assert torch.allclose(steps, steps.round(), atol=1e-3) and len(row.unique()) > 2


def test_mixed_weight_is_binary_in_its_binary_rows_and_int8_elsewhere() -> None:
    weight = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    mixed = mixed_weight(weight, [1, 4])
    assert torch.equal(mixed[[1, 4]], binary_weight(weight)[[1, 4]])
    assert torch.equal(mixed[[0, 2, 3, 5]], int8_weight(weight)[[0, 2, 3, 5]])


def test_channels_back_gives_int8_to_the_costliest_channels_within_the_byte_budget(one_step) -> None:
    model, _ = shared_amplitudes(one_step)
    weighted = model.graph.weighted()
    middle = [node.name for node in weighted[1:-1]]
    formats = {node.name: ("binary" if node.name in middle else "int8") for node in weighted}
    graph = model.graph.copy()
    for node in graph.weighted():
        node.attrs["weight_format"] = formats[node.name]
    all_binary = model_bytes(replace(model, graph=graph))
    last = graph[middle[-1]]
    row = last.params["weight"][0].numel()
    budget = all_binary + int(3.5 * (row - row / 8))  # room for three of the last layer's channels as int8
    result, new_formats, log = channels_back(model, formats, middle, budget)
    node = result.graph[middle[-1]]
    assert new_formats[middle[-1]] == node.attrs["weight_format"] == "mixed"
    assert log == [{"layer": middle[-1], "int8_channels": 3, "binary_channels": last.params["weight"].shape[0] - 3}]
    int8_rows = sorted(set(range(node.params["weight"].shape[0])) - set(binary_rows(node)))
    assert int8_rows == sorted(row_errors(last.params["weight"]).argsort(descending=True)[:3].tolist())
    assert all(new_formats[name] == "binary" for name in middle[:-1])
    assert all_binary < model_bytes(result) <= budget
    # Nothing to give: the budget of the all-binary model leaves every layer as it was.
    _, unchanged, log = channels_back(model, formats, middle, all_binary)
    assert unchanged == formats and log == [{"layer": middle[-1], "int8_channels": 0, "binary_channels": last.params["weight"].shape[0]}]


def test_a_size_ratio_spends_spare_bytes_on_int8_channels(binarized, mixed) -> None:
    # ``mixed``: binarized as ``binarized`` with a size ratio that leaves 6,000 bytes more to spend.
    metrics = mixed.metrics["binarize"]
    assert model_bytes(binarized) < model_bytes(mixed) <= model_bytes(binarized) + 6000
    assert metrics["channels_back"] and metrics["channels_back"][0]["int8_channels"] > 0
    layers = [node for node in mixed.graph.weighted() if node.attrs["weight_format"] == "mixed"]
    assert len(layers) == 1 and metrics["layers"][layers[0].name]["binary_channels"] == len(binary_rows(layers[0]))
    # Last binarized first: layers that got every channel back are int8 again, the one the budget ran out in is mixed.
    accepted = [step["layer"] for step in metrics["steps"] if step["accepted"]]
    assert [entry["layer"] for entry in metrics["channels_back"]] == accepted[::-1][: len(metrics["channels_back"])]
    assert layers[0].name == metrics["channels_back"][-1]["layer"]
    assert all(entry["binary_channels"] == 0 and metrics["layers"][entry["layer"]]["weight_format"] == "int8" for entry in metrics["channels_back"][:-1])
    _assert_binary_and_int8_rows(layers[0])
    assert metrics["binary_fraction"] == pytest.approx(binary_share(mixed), abs=1e-4) and binary_share(mixed) < binary_share(binarized)
