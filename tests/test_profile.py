"""Hardware profile: op counts against hand counts, the crossbar simulation against the ideal SNN,
monotonic degradation, seeding, the report's constants, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from edgesnn.artifacts import LoadedModel, SyntheticSet
from edgesnn.capture import capture
from edgesnn.cli import app
from edgesnn.convert import ConvertConfig, SpikingNetwork, convert
from edgesnn.crossbar import CrossbarConfig, CrossbarError, crossbar_logits, mapping_summary, monte_carlo
from edgesnn.profile import OP_CLASSES, TARGETS, ProfileConfig, ProfileError, count_ann, count_snn, load_target, profile, report_markdown


class Small(nn.Module):
    """conv 1→2 (3×3, pad 1) → ReLU → conv 2→3 (3×3, pad 1, stride 2) → ReLU → flatten → linear 3·4·4→5, on 1×8×8."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.fc = nn.Linear(48, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    module = Small().eval()
    with torch.no_grad():
        module.conv1.weight.abs_()  # most inputs positive: both layers spike
        module.conv2.weight.abs_()
    teacher = capture(LoadedModel(module, (1, 8, 8), 5, None, "small", "pickle"))
    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model = convert(teacher, SyntheticSet(images, torch.zeros(16, dtype=torch.long), torch.zeros(16, 5), "test", {}), ConvertConfig(timesteps=3, bias_correction=False, threshold_mode="max"))
    return teacher, model, images


def _spikes(model, images, timesteps):
    """The first neuron layer's spikes (T·N × 2 × 8 × 8) and the second's (T·N × 3 × 4 × 4) from the ideal simulator."""
    simulator = SpikingNetwork(model)
    store = {}
    names = [node.name for node in model.graph.neurons()]
    handles = [simulator.network.layer(name).register_forward_hook(lambda m, i, o, name=name: store.__setitem__(name, o.detach())) for name in names]
    with torch.no_grad():
        simulator(images, timesteps)
    for handle in handles:
        handle.remove()
    return [store[name] for name in names]


def test_op_counts_match_hand_counts(small):
    teacher, model, images = small
    ann = count_ann(teacher.graph, images)
    # conv1: 2·8·8 outputs × 9; conv2: 3·4·4 outputs × 18; fc: 5 × 48.
    assert [layer["macs"] for layer in ann["layers"]] == [2 * 64 * 9, 3 * 16 * 18, 5 * 48]
    assert ann["macs"] == 1152 + 864 + 240
    assert ann["weight_bytes"] == 4 * (18 + 2 + 54 + 3 + 240 + 5)

    steps = 3
    snn = count_snn(model, images, steps)
    first, second = _spikes(model, images, steps)
    # conv2 (stride 2, pad 1): each spike at (c, i, j) reaches the outputs (p, q) with |2p − i + 1| ≤ 1 inside 4×4, times 3 channels.
    expected = 0
    for sample, channel, i, j in (first != 0).nonzero().tolist():
        reach = sum(1 for p in range(4) for q in range(4) if 0 <= i - (2 * p - 1) <= 2 and 0 <= j - (2 * q - 1) <= 2)
        expected += reach * 3
    fc_expected = int((second != 0).sum()) * 5
    layers = {layer["name"]: layer for layer in snn["layers"]}
    conv1, conv2, fc = (node.name for node in model.graph.weighted())
    assert layers[conv1]["input"] == "analog" and layers[conv1]["macs"] == 1152  # constant input: once per inference
    assert layers[conv2]["input"] == "spikes" and layers[conv2]["acs"] == pytest.approx(expected / len(images), rel=1e-9)
    assert layers[fc]["acs"] == pytest.approx(fc_expected / len(images), rel=1e-9)
    rates = {n["name"]: n["spike_rate"] for n in snn["neuron_layers"]}
    names = [n.name for n in model.graph.neurons()]
    assert rates[names[0]] == pytest.approx(float((first != 0).float().mean()), abs=1e-6)
    assert snn["neuron_updates"] == (128 + 48) * steps
    assert snn["memory"]["state_bytes"] == 4 * (128 + 48 + 5)


def test_weight_bytes_per_format(small):
    _, model, images = small
    graph = model.graph.copy()
    conv1, conv2, fc = graph.weighted()
    conv2.attrs["weight_format"], fc.attrs["weight_format"] = "binary", "int8"
    from dataclasses import replace

    snn = count_snn(replace(model, graph=graph), images[:2], 1)
    by_name = {layer["name"]: layer for layer in snn["layers"]}
    assert by_name[conv1.name]["weight_bytes"] == 4 * 18 + 4 * 2
    assert by_name[conv2.name]["weight_bytes"] == math.ceil(54 / 8) + 4 * 3 + 4 * 3  # 1-bit weights, α and bias per channel
    assert by_name[fc.name]["weight_bytes"] == 240 + 4 * 5 + 4 * 5
    assert by_name[conv2.name]["weight_bits"] == 1 and by_name[fc.name]["weight_bits"] == 8
    assert snn["memory"]["state_bytes"] == 0  # T = 1: no membrane carried between inferences


def test_a_mixed_layer_counts_each_output_channel_at_its_width(small):
    from dataclasses import replace

    from edgesnn.profile import snn_op_counts

    _, model, images = small
    graph = model.graph.copy()
    conv1, conv2, fc = graph.weighted()
    conv2.attrs["weight_format"], conv2.attrs["binary_rows"] = "mixed", [0, 2]  # channels 0 and 2 of 3 binary, 1 int8
    fc.attrs["weight_format"] = conv1.attrs["weight_format"] = "int8"
    snn = count_snn(replace(model, graph=graph), images[:2], 1)
    layer = {layer["name"]: layer for layer in snn["layers"]}[conv2.name]
    assert layer["weight_bytes"] == math.ceil(36 / 8) + 18 + 4 * 3 + 4 * 3  # 2 channels × 18 bits packed, 18 int8, α/scale and bias
    assert layer["weight_bits"] == pytest.approx((2 + 8) / 3, abs=1e-3) and layer["binary_share"] == pytest.approx(2 / 3)
    assert snn["integer"]
    counts = snn_op_counts(snn)
    assert counts["binary_ac"] == pytest.approx(layer["acs"] * 2 / 3) and counts["int8_ac"] == pytest.approx(layer["acs"] / 3 + {l["name"]: l for l in snn["layers"]}[fc.name]["acs"])


@pytest.fixture(scope="module")
def images(real_images):
    return torch.from_numpy(real_images.images[:200]), torch.from_numpy(real_images.labels[:200])


@pytest.mark.parametrize("timesteps", [1, 2])
def test_zero_non_idealities_are_bit_identical(vgg_one_step, images, timesteps):
    x = images[0][:100]
    ideal = SpikingNetwork(vgg_one_step)(x, timesteps)[-1]
    logits = crossbar_logits(vgg_one_step, x, CrossbarConfig(trials=3, timesteps=timesteps, on_off_ratio=20.0))
    for trial in range(3):
        assert torch.equal(logits[:, trial], ideal)


def test_accuracy_degrades_with_variation_and_is_seeded(vgg_one_step, images):
    x, y = images
    means, halves = [], []
    for sigma in (0.0, 0.15, 0.4, 0.8):
        summary = monte_carlo(vgg_one_step, x, y, CrossbarConfig(variation=sigma, trials=6, seed=3)).summary()
        means.append(summary["accuracy"]["mean"])
        halves.append((summary["accuracy"]["ci95"][1] - summary["accuracy"]["ci95"][0]) / 2)
    for index in range(len(means) - 1):
        assert means[index + 1] <= means[index] + halves[index] + halves[index + 1] + 1e-9, (means, halves)
    assert means[-1] < means[0] - 0.1
    config = CrossbarConfig(variation=0.2, faults=0.01, read_noise=0.05, adc_bits=5, ir_drop=0.05, trials=4, seed=7)
    first = monte_carlo(vgg_one_step, x[:80], y[:80], config)
    again = monte_carlo(vgg_one_step, x[:80], y[:80], config)
    other = monte_carlo(vgg_one_step, x[:80], y[:80], CrossbarConfig(**{**config.__dict__, "seed": 8}))
    assert first.accuracy == again.accuracy and first.agreement == again.agreement
    assert first.accuracy != other.accuracy


@pytest.mark.parametrize("adc_bits", [None, 5])
def test_read_noise_does_not_depend_on_the_thread_count(vgg_one_step, images, adc_bits):
    x = images[0][:40]
    config = CrossbarConfig(variation=0.1, read_noise=0.05, adc_bits=adc_bits, trials=3, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = crossbar_logits(vgg_one_step, x, config)
        torch.set_num_threads(2)
        two = crossbar_logits(vgg_one_step, x, config)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-4)  # same draws; only the conv's summation order may differ
    assert not torch.equal(one[:, 0], one[:, 1])  # trials see different devices and noise


def test_read_noise_normals_are_standard_and_indexed():
    from edgesnn.crossbar_readout import mix64, normals, reference_normals

    key = mix64(11)
    draws = normals(0, 1 << 20, key).double()
    assert abs(float(draws.mean())) < 5 / 2**10 and abs(float(draws.var()) - 1) < 5 * math.sqrt(2) / 2**10  # 5 standard errors
    ordered, _ = draws.sort()
    cdf = 0.5 * (1 + torch.erf(ordered / math.sqrt(2)))
    assert float((cdf - torch.arange(1, len(draws) + 1, dtype=torch.float64) / len(draws)).abs().max()) * 2**10 < 1.95  # KS, 0.1%
    # A draw depends on its index only: any range, any split, compiled or as torch operations.
    torch.testing.assert_close(normals(1001, 5003, key), draws[1001:5003].float(), rtol=0, atol=0)
    torch.testing.assert_close(reference_normals(1001, 5003, key), draws[1001:5003].float(), rtol=0, atol=1e-5)
    assert not torch.equal(normals(0, 64, mix64(12)), draws[:64].float())


@pytest.mark.parametrize("levels", [0, 31])
@pytest.mark.parametrize("fire", [False, True])
def test_readout_kernel_matches_the_torch_reference(levels, fire, monkeypatch):
    from edgesnn import crossbar_readout

    if crossbar_readout.kernel() is None:
        pytest.skip("no C compiler: the readout runs as torch operations")
    generator = torch.Generator().manual_seed(0)
    trials, outputs = 3, 7
    partial = (torch.randn(2, trials * outputs, 5, 5, generator=generator) * 20).contiguous(memory_format=torch.channels_last)
    variance = torch.rand(2, trials * outputs, 5, 5, generator=generator).contiguous(memory_format=torch.channels_last)
    step, bias = torch.rand(outputs, generator=generator) + 0.5, torch.randn(outputs, generator=generator)

    def two_tiles():
        total = crossbar_readout.readout(None, partial, variance, trials, outputs, 5, 100, 0.3, levels, step, bias)
        neurons = (torch.randn(outputs, generator=torch.Generator().manual_seed(1)), step) if fire else None
        return crossbar_readout.readout(total, partial * 0.5, variance, trials, outputs, 5, 300, 0.3, levels, step, None, neurons)

    compiled = two_tiles()
    monkeypatch.setattr(crossbar_readout, "_library", None)
    monkeypatch.setattr(crossbar_readout, "_compile_failed", True)
    reference = two_tiles()
    assert compiled.shape == (50, trials * outputs)
    # The same draws; rint may differ where log/cos/sin round differently right at a half step.
    close = torch.isclose(compiled, reference, rtol=1e-5, atol=1e-5)
    assert float(close.float().mean()) > 0.99 if levels else bool(close.all())


def test_readout_kernel_is_compiled_once_per_machine(tmp_path, monkeypatch):
    from edgesnn import crossbar_readout

    if crossbar_readout.kernel() is None:
        pytest.skip("no C compiler: the readout runs as torch operations")
    monkeypatch.setenv("EDGESNN_CACHE_DIR", str(tmp_path))
    built = crossbar_readout._compile()  # compiles and keeps the library in the cache folder
    kept = list(tmp_path.glob("readout-*.so"))
    assert len(kept) == 1 and not list(tmp_path.glob("*.partial"))
    calls = []
    monkeypatch.setattr(crossbar_readout, "_build", lambda *arguments: calls.append(arguments))
    loaded = crossbar_readout._compile()  # a later process: loaded from the cache, nothing compiled
    assert not calls and loaded._name == str(kept[0])
    for library in (built, loaded):
        out = torch.empty(64)
        library.esnn_normals(out.data_ptr(), 0, 64, 5)
        assert torch.equal(out, crossbar_readout.normals(0, 64, 5))


def test_read_noise_variance_shortcuts_keep_the_predictions(vgg_one_step, images, monkeypatch):
    """The variance σ_r²·Σ x²·(G⁺² + G⁻²) in bfloat16, and for spikes x ∈ {0, a} as Σ x̃·(a²/ã)·(G⁺² + G⁻²)
    (x̃, ã: rounded to bfloat16): against float32 and the explicit x², with the same draws, the noise's σ
    moves by ≲ 0.2%, which changes an ADC level or a spike only where a value sits on the edge."""
    from edgesnn import crossbar
    from edgesnn.crossbar import _Simulator

    x = images[0][:64]
    config = CrossbarConfig(variation=0.1, faults=0.01, read_noise=0.05, adc_bits=6, ir_drop=0.05, trials=3, seed=2)
    shortcut = crossbar_logits(vgg_one_step, x, config).argmax(-1)
    monkeypatch.setattr(crossbar, "VARIANCE_DTYPE", torch.float32)
    read = _Simulator._read
    monkeypatch.setattr(_Simulator, "_read", lambda self, layer, x, amplitude, *rest: read(self, layer, x, None, *rest))
    explicit = crossbar_logits(vgg_one_step, x, config).argmax(-1)
    assert float((shortcut == explicit).float().mean()) > 0.95


def test_monte_carlo_without_the_compiled_kernel_is_equivalent(vgg_one_step, images, monkeypatch):
    from edgesnn import crossbar_readout

    x = images[0][:48]
    config = CrossbarConfig(variation=0.1, faults=0.01, read_noise=0.05, adc_bits=6, ir_drop=0.05, trials=3, seed=4)
    compiled = crossbar_logits(vgg_one_step, x, config)
    monkeypatch.setattr(crossbar_readout, "_library", None)
    monkeypatch.setattr(crossbar_readout, "_compile_failed", True)
    reference = crossbar_logits(vgg_one_step, x, config)
    assert float((compiled.argmax(-1) == reference.argmax(-1)).float().mean()) > 0.95


def test_mapping_counts_tiles(vgg_one_step):
    summary = mapping_summary(vgg_one_step, 64)
    rows = {row["name"]: row for row in summary["layers"]}
    # features.10: 48 input channels of 3×3 kernels, 7 channels per 64-row tile → 7 row tiles; 96 columns → 2 column tiles.
    assert rows["features.10"]["channels_per_tile"] == 7 and rows["features.10"]["row_tiles"] == 7 and rows["features.10"]["column_tiles"] == 2
    assert summary["tiles"] == sum(row["row_tiles"] * row["column_tiles"] for row in summary["layers"])
    with pytest.raises(CrossbarError, match="tile size"):
        monte_carlo(vgg_one_step, torch.zeros(1, 1, 28, 28), None, CrossbarConfig(tile_size=100))


def test_report_states_every_constant(vgg_one_step, resnet_teacher, images):
    from edgesnn.pipeline import teacher_of
    from edgesnn.crossbar import SweepConfig

    x, y = images
    result = profile(
        vgg_one_step,
        teacher_of(vgg_one_step, "vgg"),
        x[:32],
        y[:32],
        ProfileConfig(crossbar=CrossbarConfig(variation=0.1, trials=2), sweeps=SweepConfig(variation=(0.0, 0.2), faults=(0.0,), adc_bits=(4,), trials=2), compare_timesteps=(2,), compare_variation=False),
    )
    document = result.document
    report = report_markdown(document)
    for name in TARGETS:
        assert name in document["energy_ratio"] and document["energy_ratio"][name] > 0
        for key, constant in document["constants"][name].items():
            assert constant["source"] and constant["source"] in report and key in report
    assert document["constants"]["asic45nm"]["fp32_mac.pj"]["value"] == 4.6 and document["constants"]["asic45nm"]["fp32_ac.pj"]["value"] == 0.9
    for assumption in document["assumptions"]:
        assert assumption in report
    for filename, png in result.plots.items():
        assert png.startswith(b"\x89PNG") and f"({filename})" in report
    assert [row["timesteps"] for row in document["crossbar"]["timesteps"]] == [1, 2]


def test_user_target_files(tmp_path):
    good = tmp_path / "mine.toml"
    text = (load_target("asic45nm").origin)
    good.write_text(open(text).read().replace('name = "asic45nm"', 'name = "mine"'))
    assert load_target(good).name == "mine"
    bad = tmp_path / "bad.toml"
    bad.write_text(open(text).read().replace(', source = "Horowitz, ISSCC 2014: 32-bit float add 0.9 pJ (a spike adds its weight)"', ""))
    with pytest.raises(ProfileError, match="fp32_ac"):
        load_target(bad)
    with pytest.raises(ProfileError, match="asic45nm"):
        load_target("no_such_target")
    assert set(OP_CLASSES) <= {key.split(".")[0] for key in load_target("cortex_m4").constants}


def test_cli_profile_json(vgg_one_step, tmp_path):
    from edgesnn.pipeline import spiking_bytes

    path = tmp_path / "vgg.pt"
    path.write_bytes(spiking_bytes(vgg_one_step))
    runner = CliRunner()
    result = runner.invoke(app, ["profile", str(path), "--data", "packaged", "--limit", "40", "--crossbar", "64", "--variation", "0.05", "--trials", "2", "--no-sweep", "--out", str(tmp_path / "p"), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert set(document["energy_ratio"]) == set(TARGETS) and all(value > 0 for value in document["energy_ratio"].values())
    assert document["crossbar"]["monte_carlo"]["trials"] == 2 and document["images"] == 40
    assert (tmp_path / "p" / "report.md").is_file() and json.loads((tmp_path / "p" / "profile.json").read_text())["energy_ratio"] == document["energy_ratio"]
    bad = runner.invoke(app, ["profile", str(path), "--data", "packaged", "--limit", "4", "--target", "nowhere"])
    assert bad.exit_code == 1 and "nowhere" in bad.output
