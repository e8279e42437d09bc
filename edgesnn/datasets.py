"""Readers for labelled image sets used to evaluate models on real data.

Formats: an IDX folder in the MNIST / Fashion-MNIST layout (``.gz`` or not), an
``.npz`` with arrays ``x`` and ``y``, and CIFAR-10 python batches. Images come
back as float32 ``N×C×H×W`` scaled to [0, 1] and then normalised per channel:
``x = (pixel / 255 - mean) / std``. Real data is only ever used for evaluation
and for training the zoo teachers, never by the data-free build.
"""

from __future__ import annotations

import gzip
import io
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .archives import allowed_expansion, check_npz
from .errors import DataError

# What a hostile or damaged pickle makes the (code-free) unpickler raise.
_CORRUPT_PICKLE = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError, RecursionError, OverflowError, UnicodeDecodeError)

# Largest array an IDX header may declare (elements). Protects against a header
# that claims terabytes and makes us allocate before noticing the file is short.
_MAX_IDX_ELEMENTS = 2**31

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

PACKAGED_SUBSET = Path(__file__).parent / "zoo" / "fashion_mnist_test_2000.npz"


@dataclass(frozen=True)
class LabelledImages:
    """A labelled image set, ready for a model."""

    images: np.ndarray  # float32 N×C×H×W, normalised as asked
    labels: np.ndarray  # int64 N, class indices
    source: str  # where the images came from, for reports


def parse_normalize(text: str | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Parse ``MEAN:STD`` where each side is a comma-separated per-channel list."""
    if text is None or text == "":
        return None
    if text.count(":") != 1:
        raise DataError(f"--normalize {text!r}: expected MEAN:STD, e.g. 0.2860:0.3530 or 0.485,0.456,0.406:0.229,0.224,0.225")
    mean_text, std_text = text.split(":")
    try:
        mean = tuple(float(v) for v in mean_text.split(","))
        std = tuple(float(v) for v in std_text.split(","))
    except ValueError:
        raise DataError(f"--normalize {text!r}: MEAN and STD must be numbers separated by commas") from None
    if len(mean) != len(std):
        raise DataError(f"--normalize {text!r}: {len(mean)} mean values but {len(std)} std values")
    if any(s <= 0 or not np.isfinite(s) for s in std) or not all(np.isfinite(m) for m in mean):
        raise DataError(f"--normalize {text!r}: std values must be finite and > 0")
    return mean, std


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a NumPy array."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror})") from None
    if raw[:2] == b"\x1f\x8b":
        raw = _gunzip_idx(path, raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = 1
    for size in shape:
        count *= size  # Python integers: a hostile header cannot overflow them
    if count > _MAX_IDX_ELEMENTS:
        raise DataError(f"{path}: IDX header declares {count} elements, more than the {_MAX_IDX_ELEMENTS} allowed")
    expected = header + count * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: IDX header declares shape {shape} ({expected} bytes) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _gunzip_idx(path: Path, raw: bytes) -> bytes:
    """Decompress a gzipped IDX file no further than its header says it is long (a gzip bomb stops there)."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:
            head = stream.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
                return head  # read_idx names the problem
            dimensions = stream.read(4 * head[3])
            head += dimensions
            if len(dimensions) < 4 * head[3]:
                return head
            count = 1
            for i in range(head[3]):
                count *= int.from_bytes(dimensions[4 * i : 4 * i + 4], "big")
            if count > _MAX_IDX_ELEMENTS:
                return head  # read_idx refuses the declared size before anything is allocated
            declared = count * np.dtype(_IDX_DTYPES[head[2]]).itemsize
            if declared > allowed_expansion(len(raw)):
                raise DataError(f"{path}: gzip of {len(raw)} bytes declares {declared} bytes of IDX data, more than the {allowed_expansion(len(raw))} allowed (a gzip bomb?)")
            body = stream.read(count * np.dtype(_IDX_DTYPES[head[2]]).itemsize + 1)  # one byte more reveals trailing data
            return head + body
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: corrupt gzip stream ({error})") from None


def _find_idx(folder: Path, split: str, kind: str) -> Path | None:
    prefix = "t10k" if split == "test" else "train"
    suffix = "idx3-ubyte" if kind == "images" else "idx1-ubyte"
    for name in (f"{prefix}-{kind}-{suffix}", f"{prefix}-{kind}.{suffix}"):
        for candidate in (folder / name, folder / (name + ".gz")):
            if candidate.is_file():
                return candidate
    return None


def _load_idx_folder(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = _find_idx(folder, split, "images")
    labels_path = _find_idx(folder, split, "labels")
    if images_path is None or labels_path is None:
        prefix = "t10k" if split == "test" else "train"
        raise DataError(f"{folder}: no {split} split in MNIST layout (expected {prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz])")
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"{folder}: expected images N×H×W and labels N, found {images.shape} and {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} images but {len(labels)} labels")
    return images[:, None, :, :], labels


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    check_npz(path, DataError, ".npz")  # array sizes are allocated before they are read
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = set(archive.files)
            x_key = next((k for k in ("x", "images", "x_test") if k in names), None)
            y_key = next((k for k in ("y", "labels", "y_test") if k in names), None)
            if x_key is None or y_key is None:
                raise DataError(f"{path}: expected arrays 'x' and 'y' (found {sorted(names)})")
            images, labels = archive[x_key], archive[y_key]
    except DataError:
        raise
    except (OSError, ValueError, TypeError, zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError, MemoryError) as error:
        raise DataError(f"{path}: not a readable .npz ({_first_line(error)})") from None
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)  # N×H×W×C → N×C×H×W
    if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{path}: expected x as N×H×W or N×C×H×W and y as N, found {images.shape} and {labels.shape}")
    return images, labels


class _NoCodeUnpickler(pickle.Unpickler):
    """CIFAR batches are pickled dicts of arrays: allow only what they need."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_cifar(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{folder}: CIFAR-10 batch {name!r} is missing")
        try:
            with path.open("rb") as handle:
                batch = _NoCodeUnpickler(handle, encoding="bytes").load()
        except _CORRUPT_PICKLE as error:  # the unpickler runs no code; anything it raises is the file's fault
            raise DataError(f"{path}: not a CIFAR-10 python batch ({type(error).__name__}: {_first_line(error)})") from None
        if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
            raise DataError(f"{path}: CIFAR-10 batch lacks 'data' or 'labels'")
        try:
            data = batch[b"data"]
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
                raise ValueError(f"data is a {type(data).__name__} of {getattr(data, 'dtype', 'objects')}, expected a uint8 array")
            label = np.asarray(batch[b"labels"])
            if label.ndim != 1 or (len(label) and not np.issubdtype(label.dtype, np.integer)):
                raise ValueError(f"labels should be a list of integers, found {label.dtype} of shape {label.shape}")
        except (ValueError, TypeError, OverflowError) as error:
            raise DataError(f"{path}: malformed CIFAR-10 batch ({_first_line(error)})") from None
        if data.ndim != 2 or data.shape[1] != 3072 or len(label) != len(data):
            raise DataError(f"{path}: CIFAR-10 data should be N×3072 with N labels, found {data.shape} and {len(label)} labels")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(label.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def load_labelled_images(
    path: str | Path,
    split: str = "test",
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    limit: int | None = None,
) -> LabelledImages:
    """Load a labelled image set from an IDX folder, an ``.npz`` or CIFAR-10 batches.

    Pixels are scaled to [0, 1] (integer images are divided by 255; float images
    are kept) and then ``(x - mean) / std`` per channel when ``normalize`` is given.
    """
    path = Path(path)
    if split not in ("train", "test"):
        raise DataError(f"split {split!r}: expected 'train' or 'test'")
    if limit is not None and limit <= 0:
        raise DataError(f"--limit {limit}: must be a positive number of images")
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file():
        images, labels = _load_npz(path)
    elif (path / "test_batch").is_file() or (path / "data_batch_1").is_file():
        images, labels = _load_cifar(path, split)
    else:
        images, labels = _load_idx_folder(path, split)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    if len(images) == 0:
        raise DataError(f"{path}: contains no images")
    if images.dtype.kind not in "biuf" or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: expected numeric images and integer labels, found {images.dtype} and {labels.dtype}")
    if np.issubdtype(images.dtype, np.integer):
        array = images.astype(np.float32) / 255.0
    else:
        array = images.astype(np.float32)
        if not np.isfinite(array).all():
            raise DataError(f"{path}: images contain NaN or Inf")
    if normalize is not None:
        mean, std = (np.asarray(v, dtype=np.float32) for v in normalize)
        channels = array.shape[1]
        if len(mean) == 1:
            mean, std = np.repeat(mean, channels), np.repeat(std, channels)
        if len(mean) != channels:
            raise DataError(f"--normalize has {len(mean)} channel values but {path} has {channels} channels")
        array = (array - mean[None, :, None, None]) / std[None, :, None, None]
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise DataError(f"{path}: negative class labels")
    return LabelledImages(np.ascontiguousarray(array), labels, str(path))


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__
