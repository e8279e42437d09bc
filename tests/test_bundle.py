"""Bundle security: the sealed manifest, Ed25519 signatures, AES-256-GCM encryption, atomic publishing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgesnn import bundle, pipeline
from edgesnn.bundle import SealConfig
from edgesnn.cli import app
from edgesnn.errors import BundleError, EdgeSNNError, TamperedBundleError
from edgesnn.pipeline import build

runner = CliRunner()


def files_of(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture()
def copy(signed_bundle, tmp_path) -> Path:
    """A private copy of the signed bundle."""
    target = tmp_path / "bundle"
    shutil.copytree(signed_bundle.folder, target)
    return target


def test_manifest_hashes_every_file_and_records_versions_config_metrics(signed_bundle) -> None:
    folder = signed_bundle.folder
    manifest = json.loads((folder / "manifest.json").read_text())
    on_disk = {name for name in files_of(folder) if name not in ("manifest.json", "manifest.sig")}
    listed = manifest["bundle"]["files"]
    assert set(listed) == on_disk and any(name.startswith("c/") for name in listed)
    for name, entry in listed.items():
        data = (folder / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, name
    assert {"edgesnn", "torch", "numpy", "onnx", "python", "cryptography"} <= set(manifest["versions"])
    assert {"load", "synth", "convert", "export"} <= set(manifest["stages"])
    assert manifest["stages"]["convert"]["config"]["convert"]["timesteps"] == 1 and manifest["stages"]["synth"]["metrics"]
    assert manifest["bundle"]["encrypted"] == {} and manifest["datasets_read_by_build"] == []
    assert not list(folder.parent.glob(".*.partial"))  # the staging folder was renamed into place


def test_verify_accepts_the_untouched_bundle(signed_bundle) -> None:
    report = bundle.verify(signed_bundle.folder, signed_bundle.public)
    assert report.ok and report.signer == bundle.fingerprint(bundle.load_public_key(signed_bundle.public))
    result = runner.invoke(app, ["verify", str(signed_bundle.folder), "--pubkey", str(signed_bundle.public), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"] is True


def test_any_single_flipped_byte_in_any_file_is_detected(copy, signed_bundle) -> None:
    originals = files_of(copy)
    assert len(originals) >= 15
    for name, data in originals.items():
        for position in sorted({0, len(data) // 2, len(data) - 1}):
            flipped = bytearray(data)
            flipped[position] ^= 0x01
            (copy / name).write_bytes(bytes(flipped))
            try:
                report = bundle.verify(copy, signed_bundle.public)
            except TamperedBundleError as error:  # the manifest no longer parses: the signature failed too
                assert name == "manifest.json" and "signature" in str(error), (name, position)
            else:
                assert not report.ok, (name, position)
                if name in ("manifest.json", "manifest.sig"):
                    assert report.signature_problem is not None, (name, position)
                else:
                    assert report.signature_problem is None and report.changed == [name], (name, position, report)
                    assert not report.missing and not report.extra
            (copy / name).write_bytes(data)
    assert bundle.verify(copy, signed_bundle.public).ok


def test_missing_extra_and_renamed_files_are_named_by_the_cli(copy, signed_bundle) -> None:
    (copy / "model.onnx").unlink()
    (copy / "c" / "notes.txt").write_text("not part of the build")
    os.rename(copy / "c" / "golden_logits.txt", copy / "c" / "golden_logits.old")
    result = runner.invoke(app, ["verify", str(copy), "--pubkey", str(signed_bundle.public)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "missing: c/golden_logits.txt, model.onnx" in lines[0] and "extra: c/golden_logits.old, c/notes.txt" in lines[0]


def test_wrong_key_and_unsigned_bundles_fail(copy, signed_bundle, tmp_path) -> None:
    other = tmp_path / "other"
    bundle.keygen(other)
    report = bundle.verify(copy, tmp_path / "other.pub")
    assert not report.ok and "not by the given key" in report.signature_problem and not report.changed
    (copy / "manifest.sig").unlink()
    report = bundle.verify(copy, signed_bundle.public)
    assert not report.ok and "not signed" in report.signature_problem
    # Re-signing a tampered manifest with another key does not help the attacker.
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["final_model"] = "evil.pt"
    data = json.dumps(manifest).encode()
    (copy / "manifest.json").write_bytes(data)
    (copy / "manifest.sig").write_bytes(bundle.sign(data, bundle.load_private_key(other)))
    assert not bundle.verify(copy, signed_bundle.public).ok
    assert bundle.verify(copy, tmp_path / "other.pub").ok  # ... it is simply the other key's bundle


def test_keygen_modes_and_refusal_to_overwrite(tmp_path) -> None:
    result = runner.invoke(app, ["keygen", "--out", str(tmp_path / "id"), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["fingerprint"].startswith("ed25519:")
    assert stat.S_IMODE((tmp_path / "id").stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in (tmp_path / "id").read_bytes() and b"PUBLIC KEY" in (tmp_path / "id.pub").read_bytes()
    before = (tmp_path / "id").read_bytes()
    again = runner.invoke(app, ["keygen", "--out", str(tmp_path / "id")])
    assert again.exit_code == 1 and "refusing to overwrite" in again.stderr and (tmp_path / "id").read_bytes() == before
    aes = runner.invoke(app, ["keygen", "--aes", "--out", str(tmp_path / "aes.key")])
    assert aes.exit_code == 0 and len((tmp_path / "aes.key").read_bytes()) == 32
    assert stat.S_IMODE((tmp_path / "aes.key").stat().st_mode) == 0o600


def test_encrypted_build_resumes_and_decrypts_to_identical_files(signed_bundle, tmp_path) -> None:
    out = tmp_path / "bundle"
    shutil.copytree(signed_bundle.folder, out)
    plain = files_of(out)
    aes = tmp_path / "aes.key"
    bundle.keygen(aes, "aes")
    config = dataclasses.replace(signed_bundle.config, seal=SealConfig(sign_key=signed_bundle.key, encrypt_key=aes))
    result = build(config, out)
    assert all(stage["resumed"] for stage in result.stages.values())  # resumed from the published bundle's files
    encrypted = json.loads((out / "manifest.json").read_text())["bundle"]["encrypted"]
    assert {"teacher.pt", "snn.pt", "model.onnx", "model.tflite", "c/esnn_model.c"} <= set(encrypted)
    assert set(encrypted) == {name for name in plain if bundle._weight_bearing(name)}
    for name, entry in encrypted.items():
        assert not (out / name).exists() and (out / entry["file"]).is_file() and entry["sha256"] == hashlib.sha256(plain[name]).hexdigest()
    report = bundle.verify(out, signed_bundle.public)
    assert report.ok and report.encrypted == sorted(encrypted)

    # A wrong key changes nothing; the right key restores every byte, and the bundle still verifies.
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(os.urandom(32))
    sealed = files_of(out)
    failed = runner.invoke(app, ["decrypt", str(out), "--key", str(wrong)])
    assert failed.exit_code == 1 and "wrong key" in failed.stderr and files_of(out) == sealed
    copy = runner.invoke(app, ["decrypt", str(out), "--key", str(aes), "--out", str(tmp_path / "plain"), "--json"])
    assert copy.exit_code == 0, copy.output
    restored = files_of(tmp_path / "plain")
    assert {name: data for name, data in restored.items() if name in plain and name not in ("manifest.json", "manifest.sig")} == {
        name: data for name, data in plain.items() if name not in ("manifest.json", "manifest.sig")
    }
    assert not any(name.endswith(".enc") for name in restored)
    assert bundle.verify(tmp_path / "plain", signed_bundle.public).decrypted == sorted(encrypted)
    assert bundle.decrypt(out, key_file=aes) == sorted(encrypted)  # in place
    assert all(files_of(out)[name] == plain[name] for name in encrypted)
    assert bundle.verify(out, signed_bundle.public).ok


def test_passphrase_encryption_round_trip(copy, signed_bundle, tmp_path) -> None:
    plain = files_of(copy)
    bundle.seal(copy, bundle.Keys(signing=bundle.load_private_key(signed_bundle.key), passphrase=b"correct horse"))
    entries = json.loads((copy / "manifest.json").read_text())["bundle"]["encrypted"]
    salts = {entry["kdf"]["salt"] for entry in entries.values()}
    nonces = {entry["nonce"] for entry in entries.values()}
    assert len(salts) == len(nonces) == len(entries) >= 5 and all(entry["kdf"]["name"] == "scrypt" for entry in entries.values())
    assert bundle.verify(copy, signed_bundle.public).ok
    wrong = runner.invoke(app, ["decrypt", str(copy), "--passphrase"], env={"EDGESNN_PASSPHRASE": "wrong horse"})
    assert wrong.exit_code == 1 and "wrong key or passphrase" in wrong.stderr
    key_instead = runner.invoke(app, ["decrypt", str(copy), "--key", str(signed_bundle.key)])
    assert key_instead.exit_code == 1 and "32-byte" in key_instead.stderr
    right = runner.invoke(app, ["decrypt", str(copy), "--passphrase"], input="correct horse\n")
    assert right.exit_code == 0, right.output
    assert all(files_of(copy)[name] == plain[name] for name in entries)


def test_swapped_or_altered_ciphertexts_do_not_decrypt(copy, signed_bundle, tmp_path) -> None:
    aes = tmp_path / "aes.key"
    bundle.keygen(aes, "aes")
    bundle.seal(copy, bundle.Keys(signing=bundle.load_private_key(signed_bundle.key), encryption=bundle.load_symmetric_key(aes)))
    snn, teacher = (copy / "snn.pt.enc").read_bytes(), (copy / "teacher.pt.enc").read_bytes()
    (copy / "snn.pt.enc").write_bytes(teacher)  # the file name is the associated data: a swap is caught
    with pytest.raises(BundleError, match="did not decrypt"):
        bundle.decrypt(copy, key_file=aes)
    assert bundle.verify(copy, signed_bundle.public).changed == ["snn.pt.enc"]
    (copy / "snn.pt.enc").write_bytes(snn)
    assert not (copy / "snn.pt").exists() and bundle.verify(copy, signed_bundle.public).ok


def test_failed_build_leaves_the_previous_bundle_and_a_rerun_resumes(signed_bundle, tmp_path, monkeypatch) -> None:
    out = tmp_path / "bundle"
    shutil.copytree(signed_bundle.folder, out)
    before = files_of(out)
    config = dataclasses.replace(signed_bundle.config, convert=dataclasses.replace(signed_bundle.config.convert, percentile=99.0), seal=SealConfig(sign_key=signed_bundle.key))

    def broken(*args, **kwargs):
        raise RuntimeError("convert crashed")

    real = pipeline._compute_snn
    monkeypatch.setattr(pipeline, "_compute_snn", broken)
    with pytest.raises(RuntimeError, match="convert crashed"):
        build(config, out)
    assert files_of(out) == before and bundle.verify(out, signed_bundle.public).ok  # the good bundle is untouched
    staging = bundle.staging_for(out)
    assert staging.is_dir() and not (staging / "manifest.sig").exists()
    monkeypatch.setattr(pipeline, "_compute_snn", real)
    result = build(config, out)
    assert {name for name, stage in result.stages.items() if stage["resumed"]} == {"load", "synth"}
    assert not staging.exists() and not list(tmp_path.glob(".*"))
    assert bundle.verify(out, signed_bundle.public).ok and files_of(out)["snn.pt"] != before["snn.pt"]


def test_bad_keys_fail_before_the_build_starts(signed_bundle, tmp_path) -> None:
    out = tmp_path / "never"
    (tmp_path / "short.key").write_bytes(b"\x01" * 31)
    for seal, fragment in [
        (SealConfig(sign_key=tmp_path / "absent"), "no such private key"),
        (SealConfig(sign_key=signed_bundle.public), "not a readable private key"),
        (SealConfig(encrypt_key=tmp_path / "short.key"), "32-byte AES-256 key"),
        (SealConfig(encrypt_key=tmp_path / "short.key", passphrase="x"), "not both"),
    ]:
        with pytest.raises(BundleError, match=fragment):
            build(dataclasses.replace(signed_bundle.config, seal=seal), out)
        assert not out.exists() and not bundle.staging_for(out).exists()


def test_hostile_manifest_paths_are_refused_even_when_signed(copy, signed_bundle, tmp_path) -> None:
    """A signer's mistake or a compromised signer must still not make verify/decrypt touch files outside the bundle."""
    signing = bundle.load_private_key(signed_bundle.key)
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    manifest = json.loads((copy / "manifest.json").read_text())
    for hostile in ("../outside.txt", "/etc/passwd", "c/../../outside.txt", "manifest.json", "a\\b"):
        document = json.loads(json.dumps(manifest))
        document["bundle"]["encrypted"] = {
            hostile: {"file": hostile, "algorithm": "AES-256-GCM", "nonce": "AAAAAAAAAAAAAAAA", "kdf": {"name": "key-file"}, "sha256": "0" * 64, "bytes": 1}
        }
        data = json.dumps(document).encode()
        (copy / "manifest.json").write_bytes(data)
        (copy / "manifest.sig").write_bytes(bundle.sign(data, signing))
        with pytest.raises(TamperedBundleError, match="outside the bundle|plain relative path"):
            bundle.verify(copy, signed_bundle.public)
        (tmp_path / "k").write_bytes(b"\x00" * 32)
        with pytest.raises(TamperedBundleError):
            bundle.decrypt(copy, key_file=tmp_path / "k")
    assert outside.read_text() == "keep me"


def test_verify_of_things_that_are_not_bundles(tmp_path, signed_bundle) -> None:
    (tmp_path / "empty").mkdir()
    for target, fragment in [(tmp_path / "absent", "no such bundle"), (tmp_path / "empty", "not an edgesnn bundle")]:
        result = runner.invoke(app, ["verify", str(target), "--pubkey", str(signed_bundle.public)])
        assert result.exit_code == 1 and fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(EdgeSNNError, match="is a private key"):
        bundle.verify(signed_bundle.folder, signed_bundle.key)
