"""Tests of the synth stage: DeepInversion, Data Impression, quality figures and the PNG preview.

Budgets are tiny (tens of images, a few dozen iterations) so the file runs in
well under a minute on two CPU cores; speed targets live in the benchmarks.
"""

from __future__ import annotations

import dataclasses
import struct
import types
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

from edgesnn.artifacts import SyntheticSet
from edgesnn.datasets import PACKAGED_SUBSET, load_labelled_images
from edgesnn.errors import SynthError
from edgesnn.synth import SynthConfig, encode_png, preview_png, synthesize
from edgesnn.synth.data_impression import class_similarity, soft_targets
from edgesnn.synth.deepinversion import class_balanced_labels, frozen
from edgesnn.synth.quality import measure
from edgesnn.zoo import ZOO

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
NORMALIZE = ((0.2860,), (0.3530,))

# small budgets that still show the method works
QUICK_DEEPINVERSION = SynthConfig(count=40, batch_size=40, iterations=32, min_iterations=16)
TINY = SynthConfig(count=20, batch_size=20, iterations=6, min_iterations=2)


def stand_in_teacher(network: nn.Module, normalize=NORMALIZE) -> types.SimpleNamespace:
    """What synthesize() reads from a Teacher: network, input_shape, num_classes, normalize."""
    return types.SimpleNamespace(network=network.eval(), input_shape=(1, 28, 28), num_classes=10, normalize=normalize)


def _require_zoo_weights(name: str) -> None:
    if not ZOO[name].weights_path.is_file():
        pytest.skip(f"zoo weights {ZOO[name].weights_path} not trained yet (scripts/train_zoo.py)")


@pytest.fixture(scope="module")
def zoo_resnet():
    """The zoo ResNet-8 as the pipeline hands it to synth: loaded and captured."""
    _require_zoo_weights("fmnist_resnet8")
    from edgesnn.pipeline import load_teacher

    return load_teacher("fmnist_resnet8")


@pytest.fixture(scope="module")
def zoo_resnet_module() -> types.SimpleNamespace:
    """The same weights in the plain nn.Module, to check what synthesize leaves behind."""
    _require_zoo_weights("fmnist_resnet8")
    network = ZOO["fmnist_resnet8"].factory()
    network.load_state_dict(torch.load(ZOO["fmnist_resnet8"].weights_path, weights_only=True))
    return stand_in_teacher(network)


@pytest.fixture(scope="module")
def fashion_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    if PACKAGED_SUBSET.is_file():
        data = load_labelled_images(PACKAGED_SUBSET, normalize=NORMALIZE)
    elif FASHION_MNIST.is_dir():
        data = load_labelled_images(FASHION_MNIST, "train", normalize=NORMALIZE, limit=2000)
    else:
        pytest.skip("no Fashion-MNIST images (packaged subset or dataset-fashion-mnist)")
    return torch.from_numpy(data.images), torch.from_numpy(data.labels)


def no_batchnorm_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv2d(8, 16, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 10),
    )


@pytest.fixture(scope="module")
def no_batchnorm_teacher(fashion_mnist) -> types.SimpleNamespace:
    """A small CNN without BatchNorm, trained for a few hundred steps on real images."""
    images, labels = fashion_mnist
    torch.manual_seed(0)
    network = no_batchnorm_cnn()
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        index = torch.randint(0, len(images), (64,), generator=generator)
        loss = nn.functional.cross_entropy(network(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return stand_in_teacher(network)


@pytest.fixture(scope="module")
def deepinversion_set(zoo_resnet) -> SyntheticSet:
    return synthesize(zoo_resnet, QUICK_DEEPINVERSION)


def test_deepinversion_images_are_classified_as_their_target(zoo_resnet, deepinversion_set):
    synthetic = deepinversion_set
    assert synthetic.method == "deepinversion"
    assert synthetic.images.shape == (40, 1, 28, 28) and synthetic.images.dtype == torch.float32
    assert synthetic.teacher_logits.shape == (40, 10)
    with torch.no_grad():
        logits = zoo_resnet.network(synthetic.images)
    torch.testing.assert_close(logits, synthetic.teacher_logits, rtol=1e-4, atol=1e-4)
    agreement = (logits.argmax(1) == synthetic.labels).float().mean().item()
    assert agreement == pytest.approx(synthetic.metrics["target_agreement"])
    assert agreement >= 0.9


def test_deepinversion_matches_batchnorm_statistics_better_than_noise(zoo_resnet, deepinversion_set):
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn((256, 1, 28, 28), generator=generator)
    noise_error = measure(zoo_resnet.network, noise, torch.zeros(256, dtype=torch.long)).bn_error
    assert deepinversion_set.metrics["bn_error"] < 0.5 * noise_error


def test_each_share_of_the_images_gets_its_own_batchnorm_weighting(zoo_resnet):
    """The images split evenly among ``bn_weightings``, in order; a share made without the BN
    term matches the running statistics far worse than a share made with it."""
    config = dataclasses.replace(QUICK_DEEPINVERSION, count=80, bn_weightings=((0.0, 0.0), (10.0, 1.0)))
    synthetic = synthesize(zoo_resnet, config)
    assert torch.bincount(synthetic.labels[:40], minlength=10).tolist() == [4] * 10  # each share is class-balanced
    without, with_bn = (measure(zoo_resnet.network, synthetic.images[part], synthetic.labels[part]).bn_error for part in (slice(0, 40), slice(40, 80)))
    assert with_bn < 0.7 * without, (with_bn, without)
    assert [list(pair) for pair in synthetic.config["bn_weightings"]] == [[0.0, 0.0], [10.0, 1.0]]


def test_boundary_targets_mix_the_label_with_one_similar_class():
    from edgesnn.synth.deepinversion import boundary_targets

    labels = class_balanced_labels(400, 4)
    similarity = torch.tensor([[1.0, 0.9, 0.01, 0.01], [0.9, 1.0, 0.01, 0.01], [0.01, 0.01, 1.0, 0.9], [0.01, 0.01, 0.9, 1.0]])
    assert boundary_targets(labels, similarity, 0.0, torch.Generator().manual_seed(0)) is None
    rows = boundary_targets(labels, similarity, 0.5, torch.Generator().manual_seed(0))
    assert rows.shape == (400, 5) and torch.equal(rows[:, 0].long(), labels)
    targets = rows[:, 1:]
    torch.testing.assert_close(targets.sum(1), torch.ones(400))
    on_label = targets.gather(1, labels[:, None]).squeeze(1)
    mixed = on_label < 1
    assert 0.4 < mixed.float().mean() < 0.6  # about the share asked for
    assert bool((on_label >= 0.5).all())  # the label keeps the larger part
    partner = targets.masked_fill(torch.nn.functional.one_hot(labels, 4).bool(), 0).argmax(1)
    assert (partner[mixed] == labels[mixed] ^ 1).float().mean() > 0.9  # the alike class, 0<->1 and 2<->3
    assert bool(((targets > 0).sum(1)[mixed] == 2).all())


def test_boundary_images_leave_the_teacher_less_certain(zoo_resnet, deepinversion_set):
    """Images aimed at two-class targets sit nearer the teacher's decision boundaries than plain ones."""
    boundary = synthesize(zoo_resnet, dataclasses.replace(QUICK_DEEPINVERSION, boundary_share=1.0))
    confidence = {name: float(s.teacher_logits.softmax(1).amax(1).mean()) for name, s in (("plain", deepinversion_set), ("boundary", boundary))}
    assert confidence["boundary"] < confidence["plain"] - 0.05, confidence
    assert (boundary.teacher_logits.argmax(1) == boundary.labels).float().mean() >= 0.75  # still mostly their label's


def test_deepinversion_images_stay_valid_pixels(deepinversion_set):
    (mean,), (std,) = NORMALIZE
    pixels = deepinversion_set.images * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_metrics_and_config_are_recorded(deepinversion_set):
    metrics = deepinversion_set.metrics
    for name in ("target_agreement", "bn_error", "diversity", "images_per_second", "seconds", "iterations_mean"):
        assert name in metrics and metrics[name] == metrics[name], name  # present and not NaN
    assert QUICK_DEEPINVERSION.min_iterations <= metrics["iterations_mean"] <= QUICK_DEEPINVERSION.iterations
    assert 0 < metrics["diversity"] < 2
    assert deepinversion_set.config == dataclasses.asdict(QUICK_DEEPINVERSION)


def test_work_units_cover_every_image_once_in_even_chunks():
    from edgesnn.synth import _units

    assert _units(320, 2, 512) == [(slice(0, 160), 0), (slice(160, 320), 1)]
    units = _units(2100, 2, 512)
    assert [part for _, part in units] == [0, 0, 0, 1, 1, 1]
    assert [rows.stop - rows.start for rows, _ in units] == [350, 350, 350, 350, 350, 350]
    assert [index for rows, _ in units for index in range(rows.start, rows.stop)] == list(range(2100))
    assert _units(3, 2, 512) == [(slice(0, 1), 0), (slice(1, 3), 1)]


def test_class_balance():
    labels = class_balanced_labels(23, 10)
    assert torch.bincount(labels, minlength=10).tolist() == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert labels[:10].tolist() == list(range(10))  # interleaved: every batch holds every class
    assert torch.bincount(class_balanced_labels(5, 10), minlength=10).tolist() == [1] * 5 + [0] * 5


def test_synthesized_labels_are_class_balanced(zoo_resnet):
    synthetic = synthesize(zoo_resnet, dataclasses.replace(TINY, count=23, batch_size=8))
    assert torch.bincount(synthetic.labels, minlength=10).tolist() == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert len(synthetic.images) == 23


def test_same_seed_same_images(zoo_resnet):
    first = synthesize(zoo_resnet, TINY)
    second = synthesize(zoo_resnet, TINY)
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.labels, second.labels)
    assert torch.equal(first.teacher_logits, second.teacher_logits)
    other = synthesize(zoo_resnet, dataclasses.replace(TINY, seed=1))
    assert not torch.equal(first.images, other.images)


def test_teacher_is_left_as_it_was(zoo_resnet_module):
    network = zoo_resnet_module.network
    before = {name: value.clone() for name, value in network.state_dict().items()}
    synthesize(zoo_resnet_module, TINY)
    assert not network.training
    assert all(p.requires_grad and p.is_contiguous() for p in network.parameters())
    assert all(torch.equal(before[name], value) for name, value in network.state_dict().items())
    # BatchNorm ran as s·x + t during synthesis: its own forward is back.
    assert not [name for name, layer in network.named_modules() if "forward" in vars(layer)]


def test_batchnorm_as_affine_matches_batchnorm(zoo_resnet_module):
    network = zoo_resnet_module.network
    images = torch.randn(16, *zoo_resnet_module.input_shape)
    with torch.no_grad():
        expected = network(images)
        with frozen(network):
            during = network(images)
            replaced = [name for name, layer in network.named_modules() if "forward" in vars(layer)]
    assert replaced == [name for name, layer in network.named_modules() if isinstance(layer, nn.BatchNorm2d)] and replaced
    assert torch.allclose(during, expected, atol=1e-4), (during - expected).abs().max()


def test_progress_reports_every_image(zoo_resnet):
    calls = []
    synthesize(zoo_resnet, TINY, progress=lambda task, done, total: calls.append((task, done, total)))
    assert calls[0] == ("synth", 0, 20) and calls[-1] == ("synth", 20, 20)
    assert [done for _, done, _ in calls] == sorted(done for _, done, _ in calls)


def test_data_impression_on_a_network_without_batchnorm(no_batchnorm_teacher):
    config = SynthConfig(count=60, batch_size=60, iterations=40, min_iterations=20)
    synthetic = synthesize(no_batchnorm_teacher, config)
    assert synthetic.method == "data_impression"
    assert "bn_error" not in synthetic.metrics
    assert torch.bincount(synthetic.labels, minlength=10).tolist() == [6] * 10
    assert synthetic.metrics["target_agreement"] > 0.3  # chance is 0.1


def test_soft_targets_are_dirichlet_draws_peaked_at_their_class(no_batchnorm_teacher):
    classifier = no_batchnorm_teacher.network[-1]
    similarity = class_similarity(classifier, epsilon=0.01)
    assert torch.allclose(similarity.diagonal(), torch.full((10,), 1.01, dtype=torch.float64))
    assert similarity.min() >= 0.01 - 1e-9
    labels = class_balanced_labels(200, 10)
    targets = soft_targets(labels, similarity, (1.0, 0.1), torch.Generator().manual_seed(0))
    assert torch.allclose(targets.sum(1), torch.ones(200), atol=1e-5)
    assert bool((targets >= 0).all()) and torch.equal(targets.argmax(1), labels)


def _not_batchnorm_linear_free() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 10, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


@pytest.mark.parametrize(
    "config, teacher_kind, expected",
    [
        (SynthConfig(count=0), "bn", "count"),
        (SynthConfig(count=-3), "bn", "count"),
        (SynthConfig(method="gan"), "bn", "method"),
        (SynthConfig(batch_size=0), "bn", "batch_size"),
        (SynthConfig(iterations=0), "bn", "iterations"),
        (SynthConfig(iterations=10, min_iterations=11), "bn", "min_iterations"),
        (SynthConfig(lr=0.0), "bn", "lr"),
        (SynthConfig(lr=float("nan")), "bn", "lr"),
        (SynthConfig(stop_confidence=1.5), "bn", "stop_confidence"),
        (SynthConfig(boundary_share=1.5), "bn", "boundary_share"),
        (SynthConfig(warm_start_fraction=1.0), "bn", "warm_start_fraction"),
        (SynthConfig(jitter=-1), "bn", "jitter"),
        (SynthConfig(temperature=0.0), "bn", "temperature"),
        (SynthConfig(dirichlet_betas=()), "bn", "dirichlet_betas"),
        (SynthConfig(bn_weightings=()), "bn", "bn_weightings"),
        (SynthConfig(bn_weightings=((10.0, -1.0),)), "bn", "bn_weightings"),
        (SynthConfig(method="deepinversion"), "no_bn", "no BatchNorm"),
        (SynthConfig(method="data_impression"), "no_linear", "no nn.Linear"),
    ],
)
def test_bad_config_raises_one_line_synth_error(config, teacher_kind, expected):
    networks = {
        "bn": lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)),
        "no_bn": no_batchnorm_cnn,
        "no_linear": _not_batchnorm_linear_free,
    }
    with pytest.raises(SynthError) as error:
        synthesize(stand_in_teacher(networks[teacher_kind]()), config)
    message = str(error.value)
    assert message.startswith("synth: ") and "\n" not in message and expected in message


def _read_png(data: bytes) -> tuple[int, int, int, bytes]:
    """Check the signature and every chunk's CRC; return width, height, colour type and the raw scanlines."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks = 8, []
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        position += 12 + length
    assert [kind for kind, _ in chunks][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, colour, _, _, _ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert depth == 8
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    return width, height, colour, raw


def _fake_set(channels: int, per_class: int) -> SyntheticSet:
    labels = torch.arange(10).repeat(per_class)
    images = torch.randn((len(labels), channels, 28, 28), generator=torch.Generator().manual_seed(0))
    return SyntheticSet(images=images, labels=labels, teacher_logits=torch.zeros(len(labels), 10), method="deepinversion", metrics={})


def test_preview_png_is_a_valid_greyscale_grid_one_row_per_class():
    width, height, colour, raw = _read_png(preview_png(_fake_set(1, 5), NORMALIZE))
    assert colour == 0
    assert (width, height) == (5 * 30 + 2, 10 * 30 + 2)  # 5 tiles of 28 px plus 2 px gaps, 10 class rows
    assert len(raw) == height * (width + 1)
    assert all(raw[row * (width + 1)] == 0 for row in range(height))  # filter byte "none" before each row


def test_preview_png_rgb_without_normalisation_and_image_cap():
    width, height, colour, raw = _read_png(preview_png(_fake_set(3, 20), None, columns=16, max_images=160))
    assert colour == 2
    assert (width, height) == (16 * 30 + 2, 10 * 30 + 2)
    assert len(raw) == height * (width * 3 + 1)


def test_encode_png_round_trip():
    pixels = torch.arange(12 * 7, dtype=torch.uint8).reshape(12, 7).numpy()
    width, height, colour, raw = _read_png(encode_png(pixels))
    assert (width, height, colour) == (7, 12, 0)
    rows = [raw[r * 8 + 1 : (r + 1) * 8] for r in range(12)]
    assert b"".join(rows) == pixels.tobytes()
