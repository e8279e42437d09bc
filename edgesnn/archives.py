"""Limits on what a zip archive (a torch.save file, a .pt2, an .npz) may declare, checked before it is read.

A zip member's declared uncompressed size is what readers allocate: PyTorch's
reader allocates each record at its declared size, and NumPy allocates an
array at the size its ``.npy`` header declares before reading a byte of it. A
small hostile file can therefore declare terabytes (a zip bomb, or a header
that lies). ``check_zip`` refuses such archives from the central directory
alone, and ``check_npz`` also reads each ``.npy`` header (a few hundred bytes)
and checks that the array it declares fits in the member that holds it.

Rules, per archive:

- a member's compressed bytes lie inside the file (else it is truncated or lying);
- a stored (uncompressed) member declares as many bytes as it stores;
- a compressed member expands at most ``MAX_RATIO`` times (deflate cannot do
  more than ~1032 on any input; more means the header lies);
- all members together declare at most ``FREE_BYTES`` or ``TOTAL_RATIO`` times
  the archive's size, whichever is larger (real checkpoints are stored, real
  npz compress a few times; a bomb expands a thousandfold), and never more than
  ``max_bytes`` (default ``MAX_ARCHIVE_BYTES``, overridable by the environment
  variable ``EDGESNN_MAX_ARCHIVE_BYTES``, which also lifts the ratio rule).
"""

from __future__ import annotations

import os
import tokenize
import zipfile
import zlib
from pathlib import Path

import numpy as np

MAX_ARCHIVE_BYTES = 8 * 2**30  # default cap on the total uncompressed size an archive may declare
MAX_RATIO = 1100  # deflate's hard limit is about 1032:1
TOTAL_RATIO = 200  # an archive as a whole may expand this many times its size ...
FREE_BYTES = 2**30  # ... or to this many bytes, whichever is larger
MAX_MEMBERS = 100_000
_ENVIRONMENT = "EDGESNN_MAX_ARCHIVE_BYTES"


def max_archive_bytes() -> int:
    """The cap on declared uncompressed bytes: ``EDGESNN_MAX_ARCHIVE_BYTES`` if set, else the default."""
    text = os.environ.get(_ENVIRONMENT, "")
    return int(text) if text.isdigit() and int(text) > 0 else MAX_ARCHIVE_BYTES


def allowed_expansion(size: int) -> int:
    """How many uncompressed bytes a compressed file of ``size`` bytes may declare (see the module docstring)."""
    if _ENVIRONMENT in os.environ:
        return max_archive_bytes()
    return min(max_archive_bytes(), max(FREE_BYTES, TOTAL_RATIO * size))


def check_zip(path: Path, error: type[Exception], what: str, max_bytes: int | None = None) -> list[zipfile.ZipInfo]:
    """The members of the zip at ``path`` once their declared sizes are shown to be sane; raises ``error`` otherwise.

    A file that is not a zip at all is not this function's business: it returns ``[]``.
    """
    try:
        if not zipfile.is_zipfile(path):
            return []
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as problem:
        raise error(f"{path}: not a readable {what} (damaged zip: {problem})") from None
    if len(members) > MAX_MEMBERS:
        raise error(f"{path}: zip declares {len(members)} members, more than the {MAX_MEMBERS} allowed for a {what}")
    total = 0
    for member in members:
        name = member.filename[:80]
        if member.header_offset + member.compress_size > size:
            raise error(f"{path}: member {name!r} declares {member.compress_size} bytes past the end of the file (truncated or damaged {what})")
        if member.compress_type == zipfile.ZIP_STORED and member.file_size != member.compress_size:
            raise error(f"{path}: stored member {name!r} declares {member.file_size} bytes but holds {member.compress_size} (damaged or hostile {what})")
        if member.file_size > MAX_RATIO * max(member.compress_size, 1) and member.file_size > 2**20:
            raise error(f"{path}: member {name!r} declares {member.file_size} bytes from {member.compress_size} compressed (ratio over {MAX_RATIO}: a zip bomb?)")
        total += member.file_size
    limit = max_bytes if max_bytes is not None else allowed_expansion(size)
    if total > limit:
        raise error(f"{path}: archive of {size} bytes declares {total} uncompressed bytes, more than the {limit} allowed (a zip bomb? set {_ENVIRONMENT} to raise the limit)")
    return members


def check_npz(path: Path, error: type[Exception], what: str, max_bytes: int | None = None) -> None:
    """``check_zip``, and every ``.npy`` member's header declares an array that fits in the member."""
    members = check_zip(path, error, what, max_bytes)
    if not members:
        return
    try:
        with zipfile.ZipFile(path) as archive:
            for member in members:
                if not member.filename.endswith(".npy"):
                    continue
                with archive.open(member) as stream:
                    version = np.lib.format.read_magic(stream)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
                    else:
                        raise error(f"{path}: member {member.filename[:80]!r} has unsupported .npy version {version}")
                    header = stream.tell()
                count = 1
                for dimension in shape:
                    count *= int(dimension)
                declared = count * dtype.itemsize
                if dtype.hasobject:
                    continue  # object arrays are refused by allow_pickle=False when read
                if declared > member.file_size - header:
                    raise error(
                        f"{path}: array {member.filename[:-4][:80]!r} declares shape {tuple(shape)} ({declared} bytes) "
                        f"but its member holds {member.file_size - header} (truncated or hostile {what})"
                    )
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, TypeError, SyntaxError, tokenize.TokenError, KeyError, zlib.error, NotImplementedError) as problem:
        raise error(f"{path}: not a readable {what} ({type(problem).__name__}: {str(problem)[:200]})") from None
