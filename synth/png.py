"""A PNG preview grid of a synthetic set, encoded with zlib and struct alone.

The grid is sorted by class, one row per class when the classes fit, so a
glance shows whether every class got recognisable and varied images.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch

from edgesnn.artifacts import Normalize, SyntheticSet

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_GAP = 2  # pixels between tiles
_GAP_VALUE = 128  # mid-grey, visible against both dark and light images


def _chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC-32 over type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray) -> bytes:
    """Encode an 8-bit image, ``H×W`` (greyscale) or ``H×W×3`` (RGB), as PNG bytes.

    Every scanline uses filter type 0 (none); the zlib stream does the compressing.
    """
    if pixels.dtype != np.uint8:
        raise ValueError(f"encode_png: expected uint8 pixels, found {pixels.dtype}")
    if pixels.ndim == 2:
        colour_type, height, width = 0, *pixels.shape
    elif pixels.ndim == 3 and pixels.shape[2] == 3:
        colour_type, height, width = 2, pixels.shape[0], pixels.shape[1]
    else:
        raise ValueError(f"encode_png: expected H×W or H×W×3 pixels, found shape {pixels.shape}")
    if height == 0 or width == 0:
        raise ValueError("encode_png: the image is empty")
    rows = np.ascontiguousarray(pixels).reshape(height, -1)
    scanlines = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1)  # filter byte 0 before each row
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 9)) + _chunk(b"IEND", b"")


def _to_pixels(images: torch.Tensor, normalize: Normalize | None) -> np.ndarray:
    """N×C×H×W normalised images → N×H×W×C uint8 pixels.

    With ``normalize=(mean, std)`` the images are de-normalised per channel
    (``pixel = x·std + mean``, clipped to [0, 1]); without it each image is
    stretched min-max to [0, 1] on its own.
    """
    images = images.detach().to(torch.float32).cpu()
    channels = images.shape[1]
    if normalize is not None:
        mean, std = (torch.tensor(v, dtype=torch.float32) for v in normalize)
        if mean.numel() == 1:
            mean, std = mean.expand(channels), std.expand(channels)
        pixels = images * std[None, :, None, None] + mean[None, :, None, None]
    else:
        low = images.amin(dim=(1, 2, 3), keepdim=True)
        high = images.amax(dim=(1, 2, 3), keepdim=True)
        pixels = (images - low) / (high - low).clamp_min(1e-12)
    pixels = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    if channels not in (1, 3):
        pixels = pixels.float().mean(dim=1, keepdim=True).round().to(torch.uint8)  # no colour model: show the channel mean
    return pixels.permute(0, 2, 3, 1).numpy()


def _grid_layout(labels: np.ndarray, columns: int, max_images: int) -> list[list[int]]:
    """Rows of image indices, sorted by class; one row per class when they fit."""
    classes = np.unique(labels)
    per_class = min(columns, max_images // len(classes)) if len(classes) else 0
    if per_class >= 1:
        return [list(np.flatnonzero(labels == c)[:per_class]) for c in classes]
    order = list(np.argsort(labels, kind="stable")[:max_images])
    return [order[i : i + columns] for i in range(0, len(order), columns)]


def preview_png(synthetic: SyntheticSet, normalize: Normalize | None, columns: int = 16, max_images: int = 160) -> bytes:
    """PNG bytes of a grid of synthetic images, sorted by class (one row per class if possible)."""
    if columns <= 0 or max_images <= 0:
        raise ValueError(f"preview_png: columns ({columns}) and max_images ({max_images}) must be positive")
    if len(synthetic.images) == 0:
        raise ValueError("preview_png: the synthetic set has no images")
    labels = synthetic.labels.cpu().numpy()
    rows = _grid_layout(labels, columns, max_images)
    shown = sorted({i for row in rows for i in row})
    tiles = dict(zip(shown, _to_pixels(synthetic.images[shown], normalize)))
    height, width, channels = next(iter(tiles.values())).shape
    grid_columns = max(len(row) for row in rows)
    canvas = np.full(
        (len(rows) * (height + _GAP) + _GAP, grid_columns * (width + _GAP) + _GAP, channels), _GAP_VALUE, np.uint8
    )
    for r, row in enumerate(rows):
        for c, index in enumerate(row):
            top, left = _GAP + r * (height + _GAP), _GAP + c * (width + _GAP)
            canvas[top : top + height, left : left + width] = tiles[index]
    return encode_png(canvas[:, :, 0] if channels == 1 else canvas)
