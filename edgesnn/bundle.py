"""The bundle: a build folder sealed with hashes, an optional Ed25519 signature and optional encryption.

A sealed bundle's ``manifest.json`` keeps everything the pipeline records
(per stage config, input/output sha256, seconds, peak RSS, metrics) and adds::

    "versions": {"edgesnn": …, "torch": …, "numpy": …, "onnx": …, "python": …, …}
    "bundle": {
        "format": "edgesnn-bundle/1",
        "files": {"binary.pt.enc": {"sha256": …, "bytes": …}, "c/esnn.c": {…}, …},   # every file but the manifest and its signature
        "encrypted": {"binary.pt": {"file": "binary.pt.enc", "algorithm": "AES-256-GCM", "nonce": b64,
                                    "kdf": {"name": "key-file"} | {"name": "scrypt", "salt": b64, "n": …, "r": …, "p": …},
                                    "sha256": <plaintext sha256>, "bytes": <plaintext bytes>}, …}
    }

``manifest.sig`` holds the Ed25519 signature of the exact bytes of
``manifest.json`` (JSON: algorithm, signer's public key, signature, base64).
Verification checks the signature first, then every file against the signed
hashes, and names each file that is changed, missing or extra.

Encryption (AES-256-GCM, ``cryptography``'s implementation) covers the
weight-bearing artifacts (``WEIGHT_BEARING``): each ``NAME`` becomes
``NAME.enc`` with a fresh 96-bit nonce; the file's path in the bundle is the
associated data, so encrypted files cannot be swapped unnoticed. The key is a
32-byte key file, or is derived per file from a passphrase by scrypt with a
fresh 16-byte salt. ``decrypt`` restores byte-identical files (their sha256 is
in the signed manifest), and a bundle stays verifiable after decryption.

Bundles are built in a staging folder beside the destination (``.NAME.partial``)
and renamed into place once sealed (``begin`` / ``publish``): an interrupted or
failed build leaves the previous bundle untouched, and a rerun resumes from the
staging folder.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import fnmatch
import hashlib
import importlib.metadata
import json
import os
import secrets
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import BundleError, TamperedBundleError

BUNDLE_FORMAT = "edgesnn-bundle/1"
MANIFEST = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
ENCRYPTED_SUFFIX = ".enc"
WEIGHT_BEARING = ("*.pt", "*.pt2", "*.onnx", "*.tflite", "*.nir", "c/esnn_model.c")  # files that hold (derived) weights
NOT_ARTIFACTS = (MANIFEST, SIGNATURE_FILE)  # the manifest does not hash itself or its signature
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # GCM's 96-bit nonce
SALT_BYTES = 16
SCRYPT_DEFAULTS = {"n": 2**15, "r": 8, "p": 1}  # ~0.1 s and 32 MiB per derivation
SCRYPT_LIMITS = {"n": (2**14, 2**20), "r": (1, 32), "p": (1, 16)}  # what a manifest may ask of decrypt
MAX_MANIFEST_BYTES = 64 * 2**20
MAX_KEY_FILE_BYTES = 64 * 2**10
TOOLS = ("edgesnn", "torch", "numpy", "onnx", "onnxruntime", "ai-edge-litert", "cryptography")
_STAGING = ".{}.partial"
_RETIRED = ".{}.old"


# ---------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class SealConfig:
    """How ``edgesnn build`` seals its bundle; every field maps to one CLI option."""

    sign_key: Path | None = None  # --sign-key: Ed25519 private key (PEM, from `edgesnn keygen`); None: unsigned
    encrypt_key: Path | None = None  # --encrypt-key: file holding a 32-byte AES key (raw, hex or base64)
    passphrase: str | None = field(default=None, repr=False)  # --encrypt-passphrase: scrypt-derived keys instead of a key file


@dataclass(frozen=True)
class Keys:
    """Keys loaded and checked before a build starts, so a bad key fails at once, not after the build."""

    signing: Any = None  # Ed25519PrivateKey or None
    encryption: bytes | None = field(default=None, repr=False)  # 32-byte AES key
    passphrase: bytes | None = field(default=None, repr=False)


def load_keys(config: SealConfig) -> Keys:
    """Read and check the keys a seal config names (one-line ``BundleError`` for anything wrong)."""
    if config.encrypt_key is not None and config.passphrase is not None:
        raise BundleError("give --encrypt-key or a passphrase, not both")
    if config.passphrase is not None and not config.passphrase:
        raise BundleError("the encryption passphrase is empty")
    return Keys(
        signing=load_private_key(config.sign_key) if config.sign_key is not None else None,
        encryption=load_symmetric_key(config.encrypt_key) if config.encrypt_key is not None else None,
        passphrase=config.passphrase.encode() if config.passphrase is not None else None,
    )


# ---------------------------------------------------------------------------
# Keys


def keygen(out: Path, kind: str = "ed25519", force: bool = False) -> list[Path]:
    """Write a new key: Ed25519 (``out`` private, mode 0600, and ``out.pub``) or a 32-byte AES key (``out``, 0600)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out)
    if kind not in ("ed25519", "aes"):
        raise BundleError(f"key kind {kind!r} is unknown; valid: ed25519, aes")
    paths = [out, out.with_name(out.name + ".pub")] if kind == "ed25519" else [out]
    for path in paths:
        if path.is_dir():
            raise BundleError(f"{path}: is a folder; expected a file name for the key")
        if path.exists() and not force:
            raise BundleError(f"{path}: exists; refusing to overwrite a key (pass --force, or choose another --out)")
    if kind == "aes":
        write_atomic(out, secrets.token_bytes(KEY_BYTES), 0o600)
        return paths
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    write_atomic(paths[0], private, 0o600)
    write_atomic(paths[1], public, 0o644)
    return paths


def load_private_key(path: Path):
    """An Ed25519 private key from a PEM (PKCS#8) or OpenSSH file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _read_key_file(path, "private key")
    try:
        if data.startswith(b"-----BEGIN OPENSSH PRIVATE KEY"):
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise BundleError(f"{path}: private key is protected by a password; edgesnn reads unencrypted keys (keep the file mode 0600)") from None
    except Exception as error:  # cryptography's parsers raise ValueError, UnsupportedAlgorithm and others for garbage input
        raise BundleError(f"{path}: not a readable private key ({_first_line(error)[:120]}); expected an Ed25519 key written by `edgesnn keygen`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path}: holds a {type(key).__name__.lstrip('_')}, expected an Ed25519 private key")
    return key


def load_public_key(path: Path):
    """An Ed25519 public key from a PEM, OpenSSH (``ssh-ed25519 …``) or raw 32-byte file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = _read_key_file(path, "public key")
    if b"PRIVATE KEY" in data:
        raise BundleError(f"{path}: is a private key; verify needs the public key (PATH.pub from `edgesnn keygen`)")
    try:
        if data.startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(data.strip())
        elif data.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        elif len(data) == 32:
            key = Ed25519PublicKey.from_public_bytes(data)
        else:
            raise ValueError("neither PEM, OpenSSH nor 32 raw bytes")
    except Exception as error:  # cryptography's parsers raise several types for garbage input
        raise BundleError(f"{path}: not a readable public key ({_first_line(error)[:120]}); expected the PATH.pub written by `edgesnn keygen`") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{path}: holds a {type(key).__name__.lstrip('_')}, expected an Ed25519 public key")
    return key


def load_symmetric_key(path: Path) -> bytes:
    """A 32-byte AES key: the raw bytes, or 64 hex digits, or base64 (surrounding whitespace ignored)."""
    data = _read_key_file(path, "encryption key")
    if len(data) == KEY_BYTES:
        return data
    text = data.strip()
    try:
        if len(text) == 2 * KEY_BYTES:
            return bytes.fromhex(text.decode("ascii"))
        decoded = base64.b64decode(text, validate=True)
        if len(decoded) == KEY_BYTES:
            return decoded
    except (ValueError, UnicodeDecodeError):
        pass
    raise BundleError(
        f"{path}: holds {len(data)} bytes, expected a 32-byte AES-256 key (raw, 64 hex digits or base64); make one with `edgesnn keygen --aes --out KEY`"
    )


def fingerprint(public_key) -> str:
    """sha256 of the raw public key, shortened: how messages name a signer."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def _read_key_file(path: Path, what: str) -> bytes:
    path = Path(path)
    try:
        if not path.is_file():
            raise BundleError(f"{path}: no such {what} file")
        if path.stat().st_size > MAX_KEY_FILE_BYTES:
            raise BundleError(f"{path}: {path.stat().st_size} bytes is far too large for a {what}")
        data = path.read_bytes()
    except OSError as error:
        raise BundleError(f"{path}: cannot read the {what} ({error.strerror})") from None
    if not data:
        raise BundleError(f"{path}: the {what} file is empty")
    return data


# ---------------------------------------------------------------------------
# Sealing


def tool_versions() -> dict[str, str]:
    """Versions of the tools that made a bundle (read from package metadata: nothing is imported)."""
    from . import __version__

    versions = {"python": sys.version.split()[0]}
    for tool in TOOLS:
        if tool == "edgesnn":
            versions[tool] = __version__
            continue
        try:
            versions[tool] = importlib.metadata.version(tool)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def seal(folder: Path, keys: Keys = Keys()) -> dict[str, Any]:
    """Encrypt (if keys say so), hash every file, record versions, rewrite the manifest and sign it.

    ``folder`` must hold a ``manifest.json`` written by the pipeline. Returns the manifest.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    manifest.pop("bundle", None)
    encrypted: dict[str, dict[str, Any]] = {}
    if keys.encryption is not None or keys.passphrase is not None:
        plain = [name for name in _artifact_files(folder) if _weight_bearing(name)]
        sealed: dict[str, tuple[bytes, dict[str, Any]]] = {}
        for name in plain:  # everything is encrypted in memory before anything on disk changes
            data = (folder / name).read_bytes()
            sealed[name] = _encrypt(name, data, keys)
        for name, (ciphertext, entry) in sealed.items():
            write_atomic(folder / entry["file"], ciphertext)
            encrypted[name] = entry
        for name in sealed:
            (folder / name).unlink()
    files = {name: {"sha256": _sha256_file(folder / name), "bytes": (folder / name).stat().st_size} for name in _artifact_files(folder)}
    manifest["versions"] = tool_versions()
    manifest["bundle"] = {"format": BUNDLE_FORMAT, "files": files, "encrypted": encrypted}
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    write_atomic(folder / MANIFEST, data)
    signature_path = folder / SIGNATURE_FILE
    if keys.signing is not None:
        write_atomic(signature_path, sign(data, keys.signing))
    elif signature_path.exists():
        signature_path.unlink()  # a stale signature of an older manifest would only fail verification
    return manifest


def sign(manifest_bytes: bytes, private_key) -> bytes:
    """The ``manifest.sig`` document for ``manifest_bytes``."""
    document = {
        "algorithm": "Ed25519",
        "signed_file": MANIFEST,
        "public_key": _b64(_raw_public(private_key.public_key())),
        "signer": fingerprint(private_key.public_key()),
        "signature": _b64(private_key.sign(manifest_bytes)),
    }
    return (json.dumps(document, indent=2) + "\n").encode()


def _encrypt(name: str, data: bytes, keys: Keys) -> tuple[bytes, dict[str, Any]]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = secrets.token_bytes(NONCE_BYTES)
    if keys.encryption is not None:
        key, kdf = keys.encryption, {"name": "key-file"}
    else:
        salt = secrets.token_bytes(SALT_BYTES)
        kdf = {"name": "scrypt", "salt": _b64(salt), **SCRYPT_DEFAULTS}
        key = _scrypt(keys.passphrase or b"", salt, SCRYPT_DEFAULTS)
    ciphertext = AESGCM(key).encrypt(nonce, data, _associated_data(name))
    entry = {
        "file": name + ENCRYPTED_SUFFIX,
        "algorithm": "AES-256-GCM",
        "nonce": _b64(nonce),
        "kdf": kdf,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }
    return ciphertext, entry


def _scrypt(passphrase: bytes, salt: bytes, parameters: dict[str, int]) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=salt, length=KEY_BYTES, n=parameters["n"], r=parameters["r"], p=parameters["p"]).derive(passphrase)


def _associated_data(name: str) -> bytes:
    return f"{BUNDLE_FORMAT}:{name}".encode()


def _weight_bearing(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in WEIGHT_BEARING)


# ---------------------------------------------------------------------------
# Verifying


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` found; ``ok`` only when the signature holds and every file matches."""

    bundle: Path
    signer: str | None  # fingerprint of the key that verified the signature, None when it did not
    signature_problem: str | None  # why the signature did not verify, or None
    changed: list[str]  # files whose sha256 differs from the manifest's
    missing: list[str]  # files the manifest lists that are not in the bundle
    extra: list[str]  # files in the bundle that the manifest does not list
    files: int  # files checked
    encrypted: list[str]  # artifacts stored encrypted (still encrypted in the bundle)
    decrypted: list[str]  # encrypted artifacts that were decrypted in place and match their recorded sha256

    @property
    def ok(self) -> bool:
        return self.signature_problem is None and not (self.changed or self.missing or self.extra)

    def summary(self) -> str:
        """One line: what is wrong (or that nothing is)."""
        if self.ok:
            return f"{self.bundle}: signature by {self.signer} holds and all {self.files} files match the manifest"
        problems = []
        if self.signature_problem:
            problems.append(self.signature_problem)
        for label, names in (("changed", self.changed), ("missing", self.missing), ("extra", self.extra)):
            if names:
                problems.append(f"{label}: {', '.join(names)}")
        return f"{self.bundle}: verification FAILED: " + "; ".join(problems)

    def to_json(self) -> dict[str, Any]:
        return {
            "bundle": str(self.bundle),
            "ok": self.ok,
            "signer": self.signer,
            "signature_problem": self.signature_problem,
            "changed": self.changed,
            "missing": self.missing,
            "extra": self.extra,
            "files": self.files,
            "encrypted": self.encrypted,
            "decrypted": self.decrypted,
        }


def verify(folder: Path, public_key) -> VerifyReport:
    """Check the bundle's signature with ``public_key`` (a key or a key file) and every file's sha256.

    Raises ``BundleError`` only when the folder is not a bundle at all; every
    difference is in the returned report.
    """
    folder = Path(folder)
    if not isinstance(public_key, (str, os.PathLike)):
        key = public_key
    else:
        key = load_public_key(Path(public_key))
    manifest_bytes = _read_manifest_bytes(folder)
    signature_problem, signer = _check_signature(folder, manifest_bytes, key)
    try:
        files, encrypted = _bundle_section(_parse_manifest(manifest_bytes, folder), folder)
    except BundleError as error:
        if signature_problem is None:
            raise  # a signed manifest the signer made unusable (or a bundle never sealed)
        raise TamperedBundleError(f"{folder}: verification FAILED: {signature_problem}; {error.args[0] if error.args else error}") from None
    expected = {name: entry["sha256"] for name, entry in files.items()}
    decrypted = []
    for name, entry in encrypted.items():
        stored = entry["file"]
        if not (folder / stored).exists() and (folder / name).is_file() and name not in expected:
            expected.pop(stored, None)
            expected[name] = entry["sha256"]
            decrypted.append(name)
    present = set(_artifact_files(folder, strict=False))
    changed = sorted(name for name in expected.keys() & present if _sha256_file(folder / name) != expected[name])
    missing = sorted(expected.keys() - present)
    extra = sorted(present - expected.keys())
    still_encrypted = sorted(name for name, entry in encrypted.items() if entry["file"] in present)
    return VerifyReport(folder, signer if signature_problem is None else None, signature_problem, changed, missing, extra, len(expected), still_encrypted, sorted(decrypted))


def _check_signature(folder: Path, manifest_bytes: bytes, key) -> tuple[str | None, str]:
    """(problem or None, fingerprint of ``key``)."""
    from cryptography.exceptions import InvalidSignature

    signer = fingerprint(key)
    path = folder / SIGNATURE_FILE
    if not path.is_file():
        return f"{SIGNATURE_FILE} is missing (the bundle is not signed)", signer
    try:
        if path.stat().st_size > MAX_KEY_FILE_BYTES:
            return f"{SIGNATURE_FILE} is too large to be a signature", signer
        document = json.loads(path.read_bytes())
        if not isinstance(document, dict) or document.get("algorithm") != "Ed25519":
            return f"{SIGNATURE_FILE} is not an Ed25519 signature document", signer
        signature = base64.b64decode(str(document.get("signature", "")), validate=True)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return f"{SIGNATURE_FILE} is unreadable or damaged", signer
    try:
        key.verify(signature, manifest_bytes)
    except InvalidSignature:
        claimed = document.get("signer")
        if isinstance(claimed, str) and claimed != signer:
            return f"signature is by {claimed[:40]}, not by the given key {signer}", signer
        return f"signature does not match {MANIFEST} (the manifest or its signature was altered)", signer
    return None, signer


# ---------------------------------------------------------------------------
# Decrypting


def decrypt(folder: Path, key_file: Path | None = None, passphrase: str | None = None, out: Path | None = None) -> list[str]:
    """Restore the encrypted artifacts of a bundle; returns the restored file names.

    Every file is decrypted and checked (GCM tag, then the plaintext sha256
    recorded in the manifest) in memory before anything is written, so a wrong
    key or a tampered file changes nothing. With ``out`` the whole bundle is
    copied there with its artifacts decrypted; without it, it is decrypted in place.
    """
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    folder = Path(folder)
    if (key_file is None) == (passphrase is None):
        raise BundleError("decrypt needs exactly one of --key FILE or --passphrase")
    key = load_symmetric_key(key_file) if key_file is not None else None
    manifest = _parse_manifest(_read_manifest_bytes(folder), folder)
    _, encrypted = _bundle_section(manifest, folder)
    if not encrypted:
        raise BundleError(f"{folder}: the bundle holds no encrypted artifacts")
    restored: dict[str, bytes] = {}
    for name, entry in sorted(encrypted.items()):
        stored = folder / entry["file"]
        if not stored.is_file():
            if (folder / name).is_file() and _sha256_file(folder / name) == entry["sha256"]:
                continue  # decrypted already
            raise BundleError(f"{folder}: {entry['file']} is missing")
        kdf = entry["kdf"]
        if kdf["name"] == "key-file":
            if key is None:
                raise BundleError(f"{folder}: {entry['file']} was encrypted with a key file; pass --key FILE, not a passphrase")
            file_key = key
        else:
            if passphrase is None:
                raise BundleError(f"{folder}: {entry['file']} was encrypted with a passphrase; pass --passphrase, not a key file")
            file_key = _scrypt(passphrase.encode(), kdf["salt"], kdf)
        try:
            plaintext = AESGCM(file_key).decrypt(entry["nonce"], stored.read_bytes(), _associated_data(name))
        except InvalidTag:
            raise BundleError(f"{folder}: {entry['file']} did not decrypt: wrong key or passphrase, or the file was altered") from None
        if hashlib.sha256(plaintext).hexdigest() != entry["sha256"]:
            raise TamperedBundleError(f"{folder}: {name} decrypted but its sha256 differs from the manifest's")
        restored[name] = plaintext
    if out is None:
        for name, plaintext in restored.items():
            write_atomic(folder / name, plaintext)
        for name in restored:
            (folder / encrypted[name]["file"]).unlink()
        return sorted(restored)
    out = Path(out)
    if out.exists():
        raise BundleError(f"--out {out}: exists; choose a new folder for the decrypted bundle")
    staging = staging_for(out)
    if staging.exists():
        _remove(staging)
    staging = _fresh_staging(out)
    try:
        _copy_tree(folder, staging, skip=lambda name: any(name == entry["file"] for entry in encrypted.values()))
        for name, plaintext in restored.items():
            write_atomic(staging / name, plaintext)
        os.rename(staging, out)
    except BaseException:
        _remove(staging)
        raise
    return sorted(restored)


# ---------------------------------------------------------------------------
# Manifest parsing (hostile input: every field is checked before use)


def read_manifest(folder: Path) -> dict[str, Any]:
    """A bundle's ``manifest.json`` as a dict (size-limited, one-line errors)."""
    folder = Path(folder)
    return _parse_manifest(_read_manifest_bytes(folder), folder)


def _read_manifest_bytes(folder: Path) -> bytes:
    if not folder.is_dir():
        raise BundleError(f"{folder}: no such bundle folder")
    path = folder / MANIFEST
    try:
        if not path.is_file():
            raise BundleError(f"{folder}: no {MANIFEST}; not an edgesnn bundle")
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{path}: {path.stat().st_size} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have")
        return path.read_bytes()
    except OSError as error:
        raise BundleError(f"{path}: cannot read ({error.strerror})") from None


def _parse_manifest(data: bytes, folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise TamperedBundleError(f"{folder / MANIFEST}: not valid JSON ({_first_line(error)[:120]})") from None
    if not isinstance(manifest, dict):
        raise TamperedBundleError(f"{folder / MANIFEST}: expected a JSON object, found {type(manifest).__name__}")
    return manifest


def _bundle_section(manifest: dict[str, Any], folder: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """The checked ``files`` and ``encrypted`` tables (nonces and salts decoded)."""
    where = f"{folder / MANIFEST}"
    section = manifest.get("bundle")
    if not isinstance(section, dict):
        raise BundleError(f"{where}: no bundle section; the folder was not sealed (rebuild it with edgesnn build)")
    if section.get("format") != BUNDLE_FORMAT:
        raise TamperedBundleError(f"{where}: bundle format {str(section.get('format'))[:40]!r}, expected {BUNDLE_FORMAT!r}")
    files, encrypted = section.get("files"), section.get("encrypted", {})
    if not isinstance(files, dict) or not isinstance(encrypted, dict):
        raise TamperedBundleError(f"{where}: bundle files/encrypted are not tables")
    checked_files = {}
    for name, entry in files.items():
        _check_name(name, where)
        if not isinstance(entry, dict) or not _is_sha256(entry.get("sha256")):
            raise TamperedBundleError(f"{where}: entry for {name[:80]!r} has no valid sha256")
        checked_files[name] = entry
    checked_encrypted = {}
    for name, entry in encrypted.items():
        _check_name(name, where)
        try:
            if not isinstance(entry, dict) or entry.get("algorithm") != "AES-256-GCM" or not _is_sha256(entry.get("sha256")):
                raise ValueError("algorithm or sha256")
            _check_name(entry["file"], where)
            nonce = base64.b64decode(entry["nonce"], validate=True)
            if len(nonce) != NONCE_BYTES:
                raise ValueError("nonce length")
            kdf = entry["kdf"]
            if kdf["name"] == "key-file":
                kdf = {"name": "key-file"}
            elif kdf["name"] == "scrypt":
                salt = base64.b64decode(kdf["salt"], validate=True)
                parameters = {p: kdf[p] for p in SCRYPT_LIMITS}
                for parameter, (low, high) in SCRYPT_LIMITS.items():
                    value = parameters[parameter]
                    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                        raise ValueError(f"scrypt {parameter}={str(value)[:20]} outside [{low}, {high}]")
                if parameters["n"] & (parameters["n"] - 1) or len(salt) < 8:
                    raise ValueError("scrypt n must be a power of two and the salt at least 8 bytes")
                kdf = {"name": "scrypt", "salt": salt, **parameters}
            else:
                raise ValueError(f"kdf {str(kdf['name'])[:20]}")
        except (KeyError, TypeError, ValueError) as error:
            raise TamperedBundleError(f"{where}: encryption entry for {name[:80]!r} is malformed ({_first_line(error)[:120]})") from None
        checked_encrypted[name] = dict(entry, nonce=nonce, kdf=kdf)
    return checked_files, checked_encrypted


def _check_name(name: Any, where: str) -> None:
    """A file name in a manifest must be a plain relative path inside the bundle."""
    if not isinstance(name, str) or not name or len(name) > 1024 or "\\" in name or "\x00" in name:
        raise TamperedBundleError(f"{where}: file name {str(name)[:80]!r} is not a plain relative path")
    path = PurePosixPath(name)
    if path.is_absolute() or any(part in ("", ".", "..") for part in name.split("/")) or name in NOT_ARTIFACTS:
        raise TamperedBundleError(f"{where}: file name {name[:80]!r} points outside the bundle or at the manifest")


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


# ---------------------------------------------------------------------------
# Writing bundles: staging folder, then rename into place


def staging_for(out: Path) -> Path:
    """Where a bundle for ``out`` is built before it is renamed into place."""
    out = Path(os.path.abspath(out))  # "." and ".." have no name of their own
    return out.parent / _STAGING.format(out.name)


def begin(out: Path, force: bool = False) -> Path:
    """The staging folder to build ``out`` in.

    An existing staging folder (an interrupted build) is resumed. Otherwise
    the files of an existing ``out`` are hard-linked (else copied) into a new
    one, so that a rerun resumes from its finished stages; the pipeline
    replaces files by rename, never in place, so the links never change ``out``.
    Encrypted artifacts and the signature are not carried over: the seal makes them anew.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BundleError(f"--out {out}: exists and is not a folder")
    absolute = Path(os.path.abspath(out))
    if absolute == absolute.parent or Path.cwd().resolve().is_relative_to(absolute.resolve()):
        raise BundleError(f"--out {out}: the bundle is built beside its folder and renamed into place; name a folder that is not the current one or above it (e.g. --out out)")
    staging = staging_for(out)
    if staging.is_dir() and not force:
        return staging
    if staging.exists():
        _remove(staging)
    staging.parent.mkdir(parents=True, exist_ok=True)
    staging = _fresh_staging(out)
    if out.is_dir() and not force:
        _copy_tree(out, staging, skip=lambda name: name.endswith(ENCRYPTED_SUFFIX) or name == SIGNATURE_FILE, link=True)
    return staging


def publish(staging: Path, out: Path) -> None:
    """Rename a sealed staging folder to ``out``; an existing ``out`` is swapped out atomically where the OS allows."""
    staging, out = Path(staging), Path(out)
    if not out.exists():
        os.rename(staging, out)
        return
    if _exchange(staging, out):
        _remove(staging)  # now holds the previous bundle
        return
    retired = out.parent / _RETIRED.format(out.name)
    if retired.exists():
        _remove(retired)
    os.rename(out, retired)
    try:
        os.rename(staging, out)
    except OSError:
        os.rename(retired, out)  # put the previous bundle back
        raise
    _remove(retired)


def _fresh_staging(out: Path) -> Path:
    staging = staging_for(out)
    staging.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir(mode=0o755)
    return staging


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically with Linux renameat2(RENAME_EXCHANGE); False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange)
    return result == 0


def _copy_tree(source: Path, target: Path, skip, link: bool = False) -> None:
    for name in _artifact_files(source, strict=False, include_manifest=True):
        if skip(name) or not stat.S_ISREG((source / name).lstat().st_mode) or (PurePosixPath(name).name.startswith(".") and name.endswith(".tmp")):
            continue  # links, special files and the temporary files of an interrupted write are not carried
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        if link:
            try:
                os.link(source / name, destination)
                continue
            except OSError:
                pass  # no hard links here: copy
        shutil.copy2(source / name, destination)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# Small helpers


def _artifact_files(folder: Path, strict: bool = True, include_manifest: bool = False) -> list[str]:
    """Relative POSIX names of every file under ``folder`` (sorted), less the manifest and its signature.

    Symbolic links and special files have no place in a bundle: with ``strict``
    they raise; without, they are listed (so verify reports them as extra).
    """
    names = []
    for root, directories, filenames in os.walk(folder):
        directories.sort()
        for filename in filenames + [d for d in directories if os.path.islink(os.path.join(root, d))]:
            path = Path(root) / filename
            name = path.relative_to(folder).as_posix()
            if name in NOT_ARTIFACTS and not include_manifest:
                continue
            mode = path.lstat().st_mode
            if not stat.S_ISREG(mode) and strict:
                raise BundleError(f"{folder}: {name} is not a regular file (links and special files cannot be sealed)")
            names.append(name)
    return sorted(names)


def _sha256_file(path: Path) -> str:
    if path.is_symlink() or not path.is_file():
        return "not a regular file"
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write through a temporary file (created 0600, fsynced) and rename into place: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        if mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _raw_public(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
