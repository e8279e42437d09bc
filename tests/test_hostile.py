"""Hostile and broken input: every parser refuses it with one line, never runs code from it, never blows up memory.

Parsers: checkpoints (torch.save zip), .pt2 archives, build artifacts (teacher.pt, snn.pt,
synthetic.npz), .npz data sets, IDX files (plain and gzip), CIFAR-10 batches, manifests and
signatures, keys, bundles. The fuzz tests mutate real inputs (the zoo checkpoint, the packaged
Fashion-MNIST subset, a real signed bundle) with hypothesis; they are derandomized so CI is
reproducible. ``EDGESNN_FUZZ_EXAMPLES=2000`` runs more, randomized, examples locally.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import shlex
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from edgesnn import archives, bundle, pipeline
from edgesnn.cli import app
from edgesnn.datasets import PACKAGED_SUBSET, load_labelled_images, read_idx
from edgesnn.errors import ArtifactError, BundleError, DataError, EdgeSNNError, LoadError
from edgesnn.load import LoadConfig, load_model
from edgesnn.zoo import ZOO

runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")  # hypothesis, about the fuzzed bytes

_EXAMPLES = int(os.environ.get("EDGESNN_FUZZ_EXAMPLES", "0"))


def fuzz(examples: int):
    """Hypothesis settings: ``examples`` derandomized examples (CI), or $EDGESNN_FUZZ_EXAMPLES random ones."""
    return settings(
        max_examples=_EXAMPLES or examples,
        derandomize=not _EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )


@st.composite
def mutated(draw, original: bytes) -> bytes:
    """``original`` truncated, with bytes flipped, a slice overwritten, or bytes inserted."""
    data = bytearray(original)
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert"]))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, max(0, len(data) - 1)))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] ^= draw(st.integers(1, 255))
        return bytes(data)
    position = draw(st.integers(0, len(data)))
    chunk = draw(st.binary(min_size=1, max_size=64))
    if kind == "overwrite":
        data[position : position + len(chunk)] = chunk
    else:
        data[position:position] = chunk
    return bytes(data)


def refused_or_read(call) -> None:
    """The parser either reads the input or refuses it with a one-line EdgeSNNError; nothing else."""
    try:
        call()
    except EdgeSNNError as error:
        message = str(error)
        assert message and "\n" not in message, message


class CreatesMarker:
    """A pickle payload that runs a shell command when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


# ---------------------------------------------------------------- real inputs


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def subset_arrays():
    with np.load(PACKAGED_SUBSET) as archive:
        return archive["x"][:64], archive["y"][:64]


@pytest.fixture(scope="module")
def small_npz(subset_arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=subset_arrays[0], y=subset_arrays[1])
    return buffer.getvalue()


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", size) for size in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture(scope="module")
def cifar_batch(subset_arrays) -> bytes:
    """A CIFAR-10 python batch (protocol 2, as the real ones) made of real Fashion-MNIST images padded to 3×32×32."""
    images = np.pad(subset_arrays[0][:16], ((0, 0), (2, 2), (2, 2)))
    data = np.repeat(images[:, None], 3, axis=1).reshape(16, 3072).astype(np.uint8)
    return pickle.dumps({b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in subset_arrays[1][:16]], b"data": data}, protocol=4)


# ---------------------------------------------------------------- code in pickles never runs


def test_cli_never_runs_a_pickle_payload(tmp_path, signed_bundle) -> None:
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": ZOO["fmnist_vgg"].factory().state_dict(), "hook": CreatesMarker(marker)}, evil)
    folder = tmp_path / "bundle"
    shutil.copytree(signed_bundle.folder, folder)
    shutil.copy(evil, folder / "snn.pt")  # a build artifact replaced by a hostile pickle
    npz = tmp_path / "evil.npz"
    np.savez(npz, x=np.array([CreatesMarker(marker)], dtype=object), y=np.zeros(1, dtype=np.int64))
    for args in (
        ["build", str(evil), "--arch", "fmnist_vgg", "--out", str(tmp_path / "out")],
        ["eval", str(evil), "--arch", "fmnist_vgg", "--data", "packaged"],
        ["export", str(folder), "--out", str(tmp_path / "deploy")],
        ["eval", str(folder), "--data", "packaged", "--limit", "10"],
        ["eval", "fmnist_vgg", "--data", str(npz)],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, (args, result.stderr)
        assert not marker.exists(), args
    assert not (tmp_path / "out").exists() and not (tmp_path / "deploy").exists()
    with pytest.raises(ArtifactError):
        pipeline.read_synthetic(npz)
    assert not marker.exists()
    # Control: the payload is real, and runs when the user trusts the file.
    with pytest.raises(LoadError):
        load_model(str(evil), LoadConfig(trust_pickle=True))
    assert marker.exists()


# ---------------------------------------------------------------- archives that declare huge sizes


def test_npz_zip_bomb_is_refused_before_it_is_inflated(tmp_path, monkeypatch) -> None:
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, x=np.zeros((64, 1024, 512), dtype=np.uint8), y=np.zeros(64, dtype=np.int64))  # 32 MiB → ~32 KiB
    assert bomb.stat().st_size < 200_000
    monkeypatch.setattr(archives, "FREE_BYTES", 2**20)  # the real rule's floor is 1 GiB; the ratio rule is the same
    with pytest.raises(DataError, match="zip bomb"):
        load_labelled_images(bomb)
    with pytest.raises(ArtifactError, match="zip bomb"):
        pipeline.read_synthetic(bomb)
    monkeypatch.setenv("EDGESNN_MAX_ARCHIVE_BYTES", str(2**30))  # the user can lift the limit for a file they trust
    assert load_labelled_images(bomb).images.shape == (64, 1, 1024, 512)
    monkeypatch.setenv("EDGESNN_MAX_ARCHIVE_BYTES", str(2**24))
    with pytest.raises(DataError, match="EDGESNN_MAX_ARCHIVE_BYTES"):
        load_labelled_images(bomb)


def test_npy_header_that_lies_about_its_shape(tmp_path) -> None:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 1000, 1000)})
    liar = tmp_path / "liar.npz"
    with zipfile.ZipFile(liar, "w") as archive:
        archive.writestr("x.npy", header.getvalue() + b"\0" * 64)
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(10, dtype=np.int64))
        archive.writestr("y.npy", buffer.getvalue())
    with pytest.raises(DataError, match="declares shape"):
        load_labelled_images(liar)


def test_checkpoint_zip_with_huge_declared_sizes(tmp_path, monkeypatch) -> None:
    original = ZOO["fmnist_vgg"].weights_path.read_bytes()
    lying = bytearray(original)
    directory = lying.find(b"PK\x01\x02")
    lying[directory + 20 : directory + 28] = struct.pack("<II", 0xFFFFFFF0, 0xFFFFFFF0)  # compressed and uncompressed size
    (tmp_path / "lying.pt").write_bytes(bytes(lying))
    with pytest.raises(LoadError, match="past the end of the file"):
        load_model(str(tmp_path / "lying.pt"), LoadConfig(arch="fmnist_vgg"))
    # A deflated member that expands a thousandfold (torch.save never compresses).
    small = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, small)
    with zipfile.ZipFile(io.BytesIO(small.getvalue())) as source, zipfile.ZipFile(tmp_path / "bomb.pt", "w", zipfile.ZIP_DEFLATED) as target:
        for member in source.infolist():
            target.writestr(member.filename, source.read(member))
        target.writestr(member.filename.split("/")[0] + "/padding", b"\0" * 2**25)
    monkeypatch.setattr(archives, "FREE_BYTES", 2**20)
    for reader in (lambda: load_model(str(tmp_path / "bomb.pt"), LoadConfig(arch="fmnist_vgg")), lambda: pipeline.read_spiking(tmp_path / "bomb.pt")):
        with pytest.raises(EdgeSNNError, match="zip bomb"):
            reader()


def test_gzip_idx_bomb(tmp_path, monkeypatch) -> None:
    declared = np.zeros((3000, 28, 28), dtype=np.uint8)  # 2.3 MB of zeros, ~2 KB gzipped
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(declared)))
    assert read_idx(path).shape == (3000, 28, 28)
    monkeypatch.setattr(archives, "FREE_BYTES", 2**20)
    with pytest.raises(DataError, match="gzip bomb"):
        read_idx(path)
    # Trailing data past what the header declares is read no further than one byte.
    path.write_bytes(gzip.compress(idx_bytes(declared[:10]) + b"\0" * 2**22))
    with pytest.raises(DataError, match="declares shape"):
        read_idx(path)


# ---------------------------------------------------------------- NaN/Inf and truncation, deterministically


def test_non_finite_artifacts_are_refused(signed_bundle, tmp_path) -> None:
    state = torch.load(signed_bundle.folder / "snn.pt", weights_only=True)
    node = next(node for node in state["graph"]["nodes"] if "weight" in node["params"])
    node["params"]["weight"].view(-1)[3] = float("nan")
    torch.save(state, tmp_path / "snn.pt")
    with pytest.raises(ArtifactError, match="NaN or Inf"):
        pipeline.read_spiking(tmp_path / "snn.pt")
    synthetic = pipeline.read_synthetic(signed_bundle.folder / "synthetic.npz")
    logits = synthetic.teacher_logits.clone()
    logits[0, 0] = float("inf")
    (tmp_path / "synthetic.npz").write_bytes(pipeline.synthetic_bytes(type(synthetic)(synthetic.images, synthetic.labels, logits, synthetic.method, {}, {})))
    with pytest.raises(ArtifactError, match="NaN or Inf"):
        pipeline.read_synthetic(tmp_path / "synthetic.npz")


def parsers(signed_bundle, small_npz: bytes, cifar_batch: bytes, subset_arrays):
    """name -> (real input bytes, file name, reader of a file holding them)."""
    folder = signed_bundle.folder
    images_idx = idx_bytes(subset_arrays[0])

    def cifar(path: Path):
        batch_folder = path.parent / "cifar"
        batch_folder.mkdir(exist_ok=True)
        shutil.copy(path, batch_folder / "test_batch")
        return load_labelled_images(batch_folder)

    return {
        "checkpoint": (ZOO["fmnist_vgg"].weights_path.read_bytes(), "model.pt", lambda p: load_model(str(p), LoadConfig(arch="fmnist_vgg"))),
        "teacher.pt": ((folder / "teacher.pt").read_bytes(), "teacher.pt", pipeline.read_teacher),
        "snn.pt": ((folder / "snn.pt").read_bytes(), "snn.pt", pipeline.read_spiking),
        "synthetic.npz": ((folder / "synthetic.npz").read_bytes(), "synthetic.npz", pipeline.read_synthetic),
        "npz": (small_npz, "data.npz", load_labelled_images),
        "idx": (images_idx, "images-idx3-ubyte", read_idx),
        "idx.gz": (gzip.compress(images_idx), "images-idx3-ubyte.gz", read_idx),
        "cifar": (cifar_batch, "batch.pkl", cifar),
        "public key": (signed_bundle.public.read_bytes(), "key.pub", bundle.load_public_key),
        "private key": (signed_bundle.key.read_bytes(), "key", bundle.load_private_key),
        "aes key": (b"k" * 32, "aes.key", bundle.load_symmetric_key),
    }


PARSERS = ["checkpoint", "teacher.pt", "snn.pt", "synthetic.npz", "npz", "idx", "idx.gz", "cifar", "public key", "private key", "aes key"]


@pytest.mark.parametrize("name", PARSERS)
def test_truncated_inputs_are_refused_in_one_line(name, signed_bundle, small_npz, cifar_batch, subset_arrays, tmp_path) -> None:
    data, filename, reader = parsers(signed_bundle, small_npz, cifar_batch, subset_arrays)[name]
    path = tmp_path / filename
    path.write_bytes(data)
    reader(path)  # the real input reads
    for length in sorted({0, 1, 7, len(data) // 4, len(data) // 2, len(data) - 1}):
        if data[:length].strip() == data.strip():
            continue  # a text key without its final newline is still the whole key
        path.write_bytes(data[:length])
        with pytest.raises(EdgeSNNError) as error:
            reader(path)
        assert "\n" not in str(error.value), (name, length, str(error.value))


# ---------------------------------------------------------------- property-based fuzzing of every parser


@pytest.mark.parametrize(("name", "examples"), [("checkpoint", 25), ("teacher.pt", 30), ("snn.pt", 30), ("synthetic.npz", 40), ("npz", 40), ("idx", 60), ("idx.gz", 60), ("cifar", 60), ("public key", 60), ("private key", 60), ("aes key", 30)])
def test_fuzzed_inputs_are_read_or_refused_in_one_line(name, examples, signed_bundle, small_npz, cifar_batch, subset_arrays, work) -> None:
    data, filename, reader = parsers(signed_bundle, small_npz, cifar_batch, subset_arrays)[name]
    path = work / name.replace(" ", "_") / filename
    path.parent.mkdir(exist_ok=True)

    @fuzz(examples)
    @given(mutated(data))
    def check(candidate: bytes) -> None:
        path.write_bytes(candidate)
        refused_or_read(lambda: reader(path))

    check()


@fuzz(60)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_as_keys_and_signatures(blob) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "key"
        path.write_bytes(blob)
        for reader in (bundle.load_public_key, bundle.load_private_key, bundle.load_symmetric_key):
            refused_or_read(lambda: reader(path))


@pytest.fixture(scope="module")
def fuzz_bundle(signed_bundle, work) -> Path:
    folder = work / "fuzz_bundle"
    shutil.copytree(signed_bundle.folder, folder)
    return folder


@pytest.mark.parametrize("target", ["manifest.json", "manifest.sig"])
def test_fuzzed_manifest_and_signature(target, fuzz_bundle, signed_bundle) -> None:
    original = (fuzz_bundle / target).read_bytes()

    @fuzz(40)
    @given(mutated(original))
    def check(candidate: bytes) -> None:
        (fuzz_bundle / target).write_bytes(candidate)
        try:
            report = bundle.verify(fuzz_bundle, signed_bundle.public)
        except BundleError as error:
            assert "\n" not in str(error)
        else:
            # Any change fails verification, but for a signature file that still carries the same signature.
            assert not report.ok or candidate == original or (target == "manifest.sig" and _signature(candidate) == _signature(original))
        refused_or_read(lambda: pipeline.final_model_file(fuzz_bundle))

    try:
        check()
    finally:
        (fuzz_bundle / target).write_bytes(original)
    assert bundle.verify(fuzz_bundle, signed_bundle.public).ok


def _signature(document: bytes):
    return json.loads(document)["signature"]


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
_NAMES = st.sampled_from(["snn.pt", "c/esnn_model.c", "../up", "/abs", "a//b", "./x", "c\\d", "", "manifest.json", "x" * 2000, "snn.pt.enc"])
_ENTRY = st.fixed_dictionaries(
    {"file": _NAMES | _JSON, "algorithm": st.sampled_from(["AES-256-GCM", "ROT13"]) | _JSON, "nonce": st.sampled_from(["AAAAAAAAAAAAAAAA", "AAAA", "!!"]) | _JSON, "sha256": st.sampled_from(["0" * 64, "zz"]) | _JSON},
    optional={"kdf": st.fixed_dictionaries({"name": st.sampled_from(["key-file", "scrypt", "md5"])}, optional={"salt": st.sampled_from(["AAAAAAAAAAAAAAAAAAAAAA==", "A"]), "n": st.sampled_from([2**14, 2**40, 3, -1, True, "x"]), "r": st.integers(-2, 40), "p": st.integers(-2, 40)}) | _JSON},
)
_SECTION = st.fixed_dictionaries(
    {"format": st.sampled_from([bundle.BUNDLE_FORMAT, "other"]) | _JSON},
    optional={"files": st.dictionaries(_NAMES, st.fixed_dictionaries({"sha256": st.sampled_from(["0" * 64, "A" * 64]) | _JSON}) | _JSON, max_size=3) | _JSON, "encrypted": st.dictionaries(_NAMES, _ENTRY | _JSON, max_size=3) | _JSON},
)


def test_signed_but_hostile_manifests(signed_bundle, work) -> None:
    """The signer's key signs whatever we generate: the structure itself must be checked before use."""
    folder = work / "hostile_manifest"
    folder.mkdir()
    (folder / "snn.pt.enc").write_bytes(b"\0" * 40)
    key = bundle.load_private_key(signed_bundle.key)
    aes = work / "zero.key"
    aes.write_bytes(b"\0" * 32)
    outside = work / "outside-marker"

    @fuzz(150)
    @given(st.one_of(_JSON, st.fixed_dictionaries({"bundle": _SECTION | _JSON})))
    def check(manifest) -> None:
        data = json.dumps(manifest).encode()
        (folder / "manifest.json").write_bytes(data)
        (folder / "manifest.sig").write_bytes(bundle.sign(data, key))
        refused_or_read(lambda: bundle.verify(folder, signed_bundle.public))
        refused_or_read(lambda: bundle.decrypt(folder, key_file=aes))
        refused_or_read(lambda: bundle.decrypt(folder, passphrase="x"))
        assert not outside.exists() and sorted(p.name for p in work.iterdir() if p.name.startswith(("up", "abs")))== []

    check()
