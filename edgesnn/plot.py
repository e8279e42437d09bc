"""Line charts as PNG bytes, drawn with NumPy and encoded with zlib: no plotting library needed.

``line_chart`` draws one or more series with 95% confidence bars, axes, ticks,
a title and a legend in a 5×7 bitmap font (upper case, digits, a little
punctuation). The bytes are deterministic: the same data gives the same file.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np

# 5×7 glyphs, one string of 7 rows of 5 pixels each ("#" on).
_GLYPHS = {
    " ": ".....|.....|.....|.....|.....|.....|.....",
    "0": ".###.|#...#|#..##|#.#.#|##..#|#...#|.###.",
    "1": "..#..|.##..|..#..|..#..|..#..|..#..|.###.",
    "2": ".###.|#...#|....#|...#.|..#..|.#...|#####",
    "3": "####.|....#|....#|.###.|....#|....#|####.",
    "4": "...#.|..##.|.#.#.|#..#.|#####|...#.|...#.",
    "5": "#####|#....|####.|....#|....#|#...#|.###.",
    "6": "..##.|.#...|#....|####.|#...#|#...#|.###.",
    "7": "#####|....#|...#.|..#..|.#...|.#...|.#...",
    "8": ".###.|#...#|#...#|.###.|#...#|#...#|.###.",
    "9": ".###.|#...#|#...#|.####|....#|...#.|.##..",
    "A": ".###.|#...#|#...#|#####|#...#|#...#|#...#",
    "B": "####.|#...#|#...#|####.|#...#|#...#|####.",
    "C": ".###.|#...#|#....|#....|#....|#...#|.###.",
    "D": "###..|#..#.|#...#|#...#|#...#|#..#.|###..",
    "E": "#####|#....|#....|####.|#....|#....|#####",
    "F": "#####|#....|#....|####.|#....|#....|#....",
    "G": ".###.|#...#|#....|#.###|#...#|#...#|.####",
    "H": "#...#|#...#|#...#|#####|#...#|#...#|#...#",
    "I": ".###.|..#..|..#..|..#..|..#..|..#..|.###.",
    "J": "..###|...#.|...#.|...#.|...#.|#..#.|.##..",
    "K": "#...#|#..#.|#.#..|##...|#.#..|#..#.|#...#",
    "L": "#....|#....|#....|#....|#....|#....|#####",
    "M": "#...#|##.##|#.#.#|#.#.#|#...#|#...#|#...#",
    "N": "#...#|#...#|##..#|#.#.#|#..##|#...#|#...#",
    "O": ".###.|#...#|#...#|#...#|#...#|#...#|.###.",
    "P": "####.|#...#|#...#|####.|#....|#....|#....",
    "Q": ".###.|#...#|#...#|#...#|#.#.#|#..#.|.##.#",
    "R": "####.|#...#|#...#|####.|#.#..|#..#.|#...#",
    "S": ".####|#....|#....|.###.|....#|....#|####.",
    "T": "#####|..#..|..#..|..#..|..#..|..#..|..#..",
    "U": "#...#|#...#|#...#|#...#|#...#|#...#|.###.",
    "V": "#...#|#...#|#...#|#...#|#...#|.#.#.|..#..",
    "W": "#...#|#...#|#...#|#.#.#|#.#.#|#.#.#|.#.#.",
    "X": "#...#|#...#|.#.#.|..#..|.#.#.|#...#|#...#",
    "Y": "#...#|#...#|.#.#.|..#..|..#..|..#..|..#..",
    "Z": "#####|....#|...#.|..#..|.#...|#....|#####",
    ".": ".....|.....|.....|.....|.....|.##..|.##..",
    ",": ".....|.....|.....|.....|.##..|..#..|.#...",
    "-": ".....|.....|.....|#####|.....|.....|.....",
    "+": ".....|..#..|..#..|#####|..#..|..#..|.....",
    "%": "##...|##..#|...#.|..#..|.#...|#..##|...##",
    "(": "...#.|..#..|.#...|.#...|.#...|..#..|...#.",
    ")": ".#...|..#..|...#.|...#.|...#.|..#..|.#...",
    "=": ".....|.....|#####|.....|#####|.....|.....",
    "/": ".....|....#|...#.|..#..|.#...|#....|.....",
    ":": ".....|.##..|.##..|.....|.##..|.##..|.....",
    "_": ".....|.....|.....|.....|.....|.....|#####",
    "'": "..#..|..#..|.#...|.....|.....|.....|.....",
}
_FONT = {char: np.array([[c == "#" for c in row] for row in glyph.split("|")], dtype=bool) for char, glyph in _GLYPHS.items()}
_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]
WIDTH, HEIGHT = 720, 440
LEFT, RIGHT, TOP, BOTTOM = 90, 24, 48, 64


def encode_png(pixels: np.ndarray) -> bytes:
    """RGB uint8 H×W×3 → PNG bytes (filter 0 on every scanline, zlib level 9)."""
    height, width, _ = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = np.concatenate([np.zeros((height, 1), dtype=np.uint8), pixels.reshape(height, width * 3)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + chunk(b"IEND", b"")


def _text_mask(text: str, scale: int) -> np.ndarray:
    glyphs = [_FONT.get(char.upper(), _FONT[" "]) for char in text]
    if not glyphs:
        return np.zeros((7 * scale, 0), dtype=bool)
    spaced = []
    for glyph in glyphs:
        spaced += [glyph, np.zeros((7, 1), dtype=bool)]
    mask = np.concatenate(spaced[:-1], axis=1)
    return mask.repeat(scale, axis=0).repeat(scale, axis=1)


class _Canvas:
    def __init__(self, width: int, height: int):
        self.pixels = np.full((height, width, 3), 255, dtype=np.uint8)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        height, width, _ = self.pixels.shape
        x0, x1 = sorted((int(round(x0)), int(round(x1))))
        y0, y1 = sorted((int(round(y0)), int(round(y1))))
        self.pixels[max(0, y0) : min(height, y1 + 1), max(0, x0) : min(width, x1 + 1)] = color

    def line(self, x0: float, y0: float, x1: float, y1: float, color, thickness: int = 2) -> None:
        """A square of ``thickness`` pixels at each of max(|Δx|, |Δy|) + 1 points from (x0, y0) to (x1, y1)."""
        steps = int(max(abs(x1 - x0), abs(y1 - y0), 1))
        half = thickness // 2
        t = np.linspace(0, 1, steps + 1)
        x, y = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise ValueError(f"cannot draw a line through non-finite coordinates ({x0}, {y0}) - ({x1}, {y1})")
        # Every point's square as ``rect`` rounds and clips it (half to even, as Python's round),
        # filled for all points at once: a square spans at most thickness + 1 pixels per axis.
        height, width, _ = self.pixels.shape
        spans = []
        for low, high, size in ((y - half, y - half + thickness - 1, height), (x - half, x - half + thickness - 1, width)):
            low, high = np.rint(low).astype(np.int64), np.rint(high).astype(np.int64)
            low, high = np.minimum(low, high), np.maximum(low, high)
            spans.append((np.maximum(low, 0), np.minimum(high, size - 1)))
        (row_low, row_high), (column_low, column_high) = spans
        for row_offset in range(thickness + 2):
            for column_offset in range(thickness + 2):
                rows, columns = row_low + row_offset, column_low + column_offset
                inside = (rows <= row_high) & (columns <= column_high)
                self.pixels[rows[inside], columns[inside]] = color

    def text(self, x: float, y: float, text: str, color=(0, 0, 0), scale: int = 2, anchor: str = "left", vertical: bool = False) -> None:
        mask = _text_mask(text, scale)
        if vertical:
            mask = np.rot90(mask)
        height, width = mask.shape
        if anchor == "center":
            x -= width / 2
        elif anchor == "right":
            x -= width
        if vertical:
            y -= height / 2
        x, y = int(round(x)), int(round(y))
        canvas_height, canvas_width, _ = self.pixels.shape
        ys, xs = np.nonzero(mask)
        ys, xs = ys + y, xs + x
        keep = (ys >= 0) & (ys < canvas_height) & (xs >= 0) & (xs < canvas_width)
        self.pixels[ys[keep], xs[keep]] = color


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    if not math.isfinite(low) or not math.isfinite(high):
        return [0.0, 1.0]
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw), default=raw)
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value <= high + step * 0.5:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.001:
        return f"{value:.0e}".replace("e-0", "E-").replace("e+0", "E").replace("e", "E")
    return f"{value:.4f}".rstrip("0").rstrip(".")


def line_chart(series: list[dict], title: str, x_label: str, y_label: str) -> bytes:
    """PNG of ``series`` (each: name, x, y, and optional low/high for confidence bars)."""
    canvas = _Canvas(WIDTH, HEIGHT)
    xs = [x for s in series for x in s["x"]]
    ys = [y for s in series for key in ("y", "low", "high") for y in s.get(key, [])]
    x_low, x_high = (min(xs), max(xs)) if xs else (0.0, 1.0)
    y_low, y_high = (min(ys), max(ys)) if ys else (0.0, 1.0)
    y_ticks = _nice_ticks(min(y_low, y_high), max(y_low, y_high))
    y_low, y_high = y_ticks[0], y_ticks[-1]
    distinct = sorted(set(xs))
    x_ticks = distinct if 1 < len(distinct) <= 8 else _nice_ticks(x_low, x_high)
    if len(distinct) > 8 or len(distinct) <= 1:
        x_low, x_high = x_ticks[0], x_ticks[-1]
    if x_high - x_low < 1e-12:
        x_low, x_high = x_low - 0.5, x_high + 0.5
    plot_width, plot_height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x_low) / (x_high - x_low) * plot_width

    def py(y: float) -> float:
        return TOP + plot_height - (y - y_low) / (y_high - y_low) * plot_height

    grey = (225, 225, 225)
    for tick in y_ticks:
        canvas.line(LEFT, py(tick), LEFT + plot_width, py(tick), grey, 1)
        canvas.text(LEFT - 8, py(tick) - 7, _label(tick), anchor="right")
    for tick in x_ticks:
        canvas.line(px(tick), TOP + plot_height, px(tick), TOP + plot_height + 5, (0, 0, 0), 1)
        canvas.text(px(tick), TOP + plot_height + 10, _label(tick), anchor="center")
    canvas.line(LEFT, TOP, LEFT, TOP + plot_height, (0, 0, 0), 2)
    canvas.line(LEFT, TOP + plot_height, LEFT + plot_width, TOP + plot_height, (0, 0, 0), 2)
    canvas.text(WIDTH / 2, 14, title, anchor="center")
    canvas.text(LEFT + plot_width / 2, HEIGHT - 24, x_label, anchor="center")
    canvas.text(16, TOP + plot_height / 2, y_label, vertical=True)
    for index, entry in enumerate(series):
        color = _COLORS[index % len(_COLORS)]
        points = list(zip(entry["x"], entry["y"]))
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            canvas.line(px(x0), py(y0), px(x1), py(y1), color, 2)
        for position, (x, y) in enumerate(points):
            canvas.rect(px(x) - 3, py(y) - 3, px(x) + 3, py(y) + 3, color)
            if entry.get("low") and entry.get("high"):
                low, high = py(entry["low"][position]), py(entry["high"][position])
                canvas.line(px(x), low, px(x), high, color, 1)
                canvas.line(px(x) - 4, low, px(x) + 4, low, color, 1)
                canvas.line(px(x) - 4, high, px(x) + 4, high, color, 1)
        legend_y = TOP + 8 + 20 * index
        canvas.rect(LEFT + plot_width - 150, legend_y + 3, LEFT + plot_width - 130, legend_y + 8, color)
        canvas.text(LEFT + plot_width - 122, legend_y, entry["name"])
    return encode_png(canvas.pixels)


__all__ = ["line_chart", "encode_png"]
