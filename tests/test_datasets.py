"""Readers of real labelled images: IDX (.gz or not), .npz, CIFAR-10 batches, and their refusals."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from edgesnn.datasets import PACKAGED_SUBSET, load_labelled_images, parse_normalize, read_idx
from edgesnn.errors import DataError


def _idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    return header + array.tobytes()


@pytest.fixture(scope="module")
def subset() -> tuple[np.ndarray, np.ndarray]:
    with np.load(PACKAGED_SUBSET) as archive:
        return archive["x"][:100], archive["y"][:100].astype(np.int64)


def _write_idx_folder(folder: Path, images: np.ndarray, labels: np.ndarray, compress: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in (("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels.astype(np.uint8))):
        data = _idx_bytes(array)
        if compress:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


def test_packaged_subset_is_real_balanced_fashion_mnist(subset) -> None:
    data = load_labelled_images(PACKAGED_SUBSET)
    assert data.images.shape == (2000, 1, 28, 28) and data.images.dtype == np.float32
    assert 0.0 <= data.images.min() and data.images.max() <= 1.0
    counts = np.bincount(data.labels, minlength=10)
    assert counts.min() > 150 and counts.sum() == 2000
    # Real clothing images: mean pixel near the Fashion-MNIST mean (0.286), not noise (0.5).
    assert abs(float(data.images.mean()) - 0.286) < 0.02


@pytest.mark.parametrize("compress", [True, False])
def test_idx_folder_gz_or_plain_matches_npz(tmp_path: Path, subset, compress: bool) -> None:
    images, labels = subset
    _write_idx_folder(tmp_path / "idx", images, labels, compress)
    from_idx = load_labelled_images(tmp_path / "idx", normalize=((0.286,), (0.353,)))
    np.savez(tmp_path / "data.npz", x=images, y=labels)
    from_npz = load_labelled_images(tmp_path / "data.npz", normalize=((0.286,), (0.353,)))
    assert np.array_equal(from_idx.images, from_npz.images)
    assert np.array_equal(from_idx.labels, labels)
    assert abs(float(from_idx.images.mean()) - float(((images / 255.0 - 0.286) / 0.353).mean())) < 1e-5


def test_debian_fashion_mnist_when_installed() -> None:
    folder = Path("/usr/share/datasets/fashion-mnist")
    if not folder.is_dir():
        pytest.skip("dataset-fashion-mnist is not installed")
    data = load_labelled_images(folder, "test", limit=2000)
    packaged = load_labelled_images(PACKAGED_SUBSET)
    assert np.array_equal(data.images, packaged.images) and np.array_equal(data.labels, packaged.labels)


def test_limit_and_npz_channel_last(tmp_path: Path) -> None:
    x = (np.arange(5 * 4 * 4 * 3) % 256).astype(np.uint8).reshape(5, 4, 4, 3)
    np.savez(tmp_path / "rgb.npz", x=x, y=np.arange(5))
    data = load_labelled_images(tmp_path / "rgb.npz", limit=3, normalize=((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    assert data.images.shape == (3, 3, 4, 4)
    assert np.allclose(data.images[0, :, 0, 0], (x[0, 0, 0] / 255.0 - 0.5) / 0.25)


def test_cifar_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
    with (tmp_path / "test_batch").open("wb") as handle:
        pickle.dump(batch, handle)
    data = load_labelled_images(tmp_path, "test", parse_normalize("0.4914,0.4822,0.4465:0.247,0.243,0.261"))
    assert data.images.shape == (4, 3, 32, 32) and list(data.labels) == [0, 1, 2, 3]


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch marker-should-not-exist",))


def test_cifar_batch_that_would_run_code_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with (tmp_path / "test_batch").open("wb") as handle:
        pickle.dump({b"data": _Payload(), b"labels": [0]}, handle)
    with pytest.raises(DataError, match="refusing to load"):
        load_labelled_images(tmp_path, "test")
    assert not (tmp_path / "marker-should-not-exist").exists()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda raw: raw[: len(raw) // 2], "declares shape"),
        (lambda raw: b"\x00\x00\x07\x03" + raw[4:], "bad magic"),
        (lambda raw: raw[:4] + struct.pack(">III", 10**6, 10**4, 10**4) + raw[16:], "declares"),
        (lambda raw: b"\x1f\x8b" + raw[2:30], "corrupt gzip"),
    ],
)
def test_broken_idx_files_are_refused_in_one_line(tmp_path: Path, subset, mutate, message: str) -> None:
    images, labels = subset
    _write_idx_folder(tmp_path, images, labels, compress=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(DataError, match=message) as caught:
        load_labelled_images(tmp_path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_mismatched_counts_and_missing_paths(tmp_path: Path, subset) -> None:
    images, labels = subset
    _write_idx_folder(tmp_path / "a", images, labels[:50], compress=True)
    with pytest.raises(DataError, match="100 images but 50 labels"):
        load_labelled_images(tmp_path / "a")
    with pytest.raises(DataError, match="no such file"):
        load_labelled_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no test split"):
        load_labelled_images(tmp_path / "empty")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_labelled_images(tmp_path / "junk.npz")


def test_read_idx_labels(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    path.write_bytes(_idx_bytes(np.array([3, 1, 4], dtype=np.uint8)))
    assert list(read_idx(path)) == [3, 1, 4]


@pytest.mark.parametrize(
    "text, expected",
    [("0.5:0.25", ((0.5,), (0.25,))), ("0.485,0.456,0.406:0.229,0.224,0.225", ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))), (None, None)],
)
def test_parse_normalize(text, expected) -> None:
    assert parse_normalize(text) == expected


@pytest.mark.parametrize("text", ["0.5", "a:b", "0.5,0.5:0.2", "0.5:0", "0.5:-1", "1:2:3"])
def test_parse_normalize_rejects(text: str) -> None:
    with pytest.raises(DataError, match="--normalize"):
        parse_normalize(text)


def test_normalize_channel_mismatch(tmp_path: Path, subset) -> None:
    images, labels = subset
    np.savez(tmp_path / "d.npz", x=images, y=labels)
    with pytest.raises(DataError, match="3 channel values"):
        load_labelled_images(tmp_path / "d.npz", normalize=((0.1, 0.2, 0.3), (1.0, 1.0, 1.0)))
