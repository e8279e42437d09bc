"""C99 firmware from an integer program: the runtime in ``firmware_stubs/`` plus generated model files.

``c_sources(program, stamp)`` returns every file of a self-contained folder:

- ``esnn.h``, ``esnn.c``: the kernels (copied from the package's ``firmware_stubs``);
- ``esnn_model.h``, ``esnn_model.c``: the network's constants and one call per
  op of the program, over a static arena whose size and offsets are planned
  here (first fit by tensor lifetime);
- ``harness.c``: a host program that reads raw images and prints int64 logits;
- ``Makefile``: ``make`` builds the harness with ``-std=c99 -Wall -Wextra -Werror``.

Binary layers are stored 1 bit per weight (sign bits packed 32 to a word);
other layers as int8; a mixed layer its binary output channels as bits and
the others as int8. Nothing is allocated at run time.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from edgesnn.errors import ExportError

from .program import Op, Program, TensorSpec

RUNTIME_FILES = ("esnn.h", "esnn.c")
ALIGN = 8


def _words(channels: int) -> int:
    return (channels + 31) // 32


def tensor_bytes(spec: TensorSpec) -> int:
    """Bytes of one sample of a tensor in the C layout."""
    channels, height, width = spec.shape
    if spec.kind == "bits":
        return spec.planes * height * width * _words(channels) * 4
    if spec.kind == "s16":
        return channels * height * width * 2
    if spec.kind == "s32":
        return channels * height * width * 4
    raise ExportError(f"export c: tensor {spec.name!r} of kind {spec.kind!r} has no C layout")


def _scratch_bytes(op: Op, program: Program) -> int:
    """esnn_conv_s8_{s16,bits}_get_buffer_size: one int32 accumulator per output channel."""
    if op.kind == "conv" and not op.attrs["binary"]:
        return op.arrays["weight"].shape[0] * 4
    return 0


def plan_arena(program: Program) -> tuple[dict[str, int], int, int]:
    """Offsets of every arena tensor (first fit over lifetimes), the arena size and the scratch offset.

    A tensor lives from the op that writes it to the last op that reads it;
    two tensors share bytes only when their lifetimes do not overlap. The
    logits go straight to the caller's buffer. The scratch buffer of the
    int8 convolutions (an int32 accumulator per output channel) sits after every tensor.
    """
    born = {program.input: -1}
    last: dict[str, int] = {program.input: -1}
    for index, op in enumerate(program.ops):
        born.setdefault(op.output, index)
        last.setdefault(op.output, index)
        for name in op.inputs:
            last[name] = index
    placed: list[tuple[int, int, int, int]] = []  # (offset, size, born, last)
    offsets: dict[str, int] = {}
    for name in sorted((n for n in born if n != program.output), key=lambda n: (born[n], n)):
        size = -(-tensor_bytes(program.tensors[name]) // ALIGN) * ALIGN
        busy = sorted((o, s) for o, s, b, l in placed if not (l < born[name] or last[name] < b))
        offset = 0
        for other_offset, other_size in busy:
            if offset + size <= other_offset:
                break
            offset = max(offset, other_offset + other_size)
        offsets[name] = offset
        placed.append((offset, size, born[name], last[name]))
    end = max((o + s for o, s, _, _ in placed), default=0)
    scratch = max((_scratch_bytes(op, program) for op in program.ops), default=0)
    return offsets, end + -(-scratch // ALIGN) * ALIGN, end


def _literal(value: int, ctype: str) -> str:
    if ctype == "uint32_t":
        return f"{value}u"
    if ctype == "int64_t":
        return f"{value}LL"
    if ctype == "int32_t" and value == -(2**31):
        return "(-2147483647 - 1)"
    return str(value)


def _array(name: str, ctype: str, values: np.ndarray, per_line: int = 24) -> str:
    items = [_literal(int(v), ctype) for v in np.asarray(values).reshape(-1)]
    lines = [", ".join(items[i : i + per_line]) for i in range(0, len(items), per_line)]
    body = ",\n    ".join(lines)
    return f"static const {ctype} {name}[{len(items)}] = {{\n    {body}\n}};\n"


def pack_signs(signs: np.ndarray) -> np.ndarray:
    """±1 weights [out][in][kh][kw] -> uint32 [out][kh][kw][words(in)], bit 1 = +1."""
    out_channels, in_channels, kernel_h, kernel_w = signs.shape
    ordered = np.transpose(signs > 0, (0, 2, 3, 1))  # O, kh, kw, C
    padded = np.zeros((out_channels, kernel_h, kernel_w, _words(in_channels) * 32), dtype=np.uint64)
    padded[..., :in_channels] = ordered
    bits = padded.reshape(out_channels, kernel_h, kernel_w, -1, 32)
    words = (bits << np.arange(32, dtype=np.uint64)).sum(-1)
    return words.astype(np.uint32)


def mixed_tables(weight: np.ndarray, binary: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A mixed layer's C tables: packed signs of its ``binary`` output channels, int8 codes of the others
    ([kh][kw][C][int8 channels]) and, per output channel, k for int8 column k or -(k + 1) for binary row k."""
    int8 = [o for o in range(weight.shape[0]) if o not in set(binary)]
    rows = np.zeros(weight.shape[0], dtype=np.int16)
    rows[int8] = np.arange(len(int8))
    rows[binary] = -1 - np.arange(len(binary))
    return pack_signs(weight[binary]), np.transpose(weight[int8], (2, 3, 1, 0)), rows


def _dims(spec: TensorSpec) -> str:
    return "{%d, %d, %d}" % spec.shape


def _pointer(name: str, program: Program, offsets: dict[str, int], const: bool) -> str:
    spec = program.tensors[name]
    ctype = {"bits": "uint32_t", "s16": "int16_t", "s32": "int32_t"}[spec.kind]
    qualifier = "const " if const else ""
    return f"({qualifier}{ctype} *)(arena.bytes + {offsets[name]})"


class _Writer:
    def __init__(self, program: Program, offsets: dict[str, int], scratch: int):
        self.program = program
        self.offsets = offsets
        self.scratch = scratch
        self.constants: list[str] = []
        self.calls: list[str] = []

    def constant(self, index: int, key: str, ctype: str, values: np.ndarray) -> str:
        name = f"op{index}_{key}"
        self.constants.append(_array(name, ctype, values))
        return name

    def spec(self, name: str) -> TensorSpec:
        return self.program.tensors[name]

    def call(self, index: int, op: Op, body: list[str]) -> None:
        self.calls.append(f"    {{ /* op {index}: {op.kind} {op.source} */\n" + "".join(f"        {line}\n" for line in body) + "    }\n")

    def read(self, name: str) -> str:
        return _pointer(name, self.program, self.offsets, const=True)

    def write(self, name: str) -> str:
        return _pointer(name, self.program, self.offsets, const=False)

    def conv(self, index: int, op: Op) -> None:
        source, weight = self.spec(op.inputs[0]), op.arrays["weight"]
        out = self.spec(op.output)
        kernel = weight.shape[2:]
        params = f"static const esnn_conv_params params = {{{kernel[0]}, {kernel[1]}, {op.attrs['stride'][0]}, {op.attrs['stride'][1]}, {op.attrs['padding'][0]}, {op.attrs['padding'][1]}}};"
        body = [params, f"static const esnn_dims in_dims = {_dims(source)};", f"static const esnn_dims out_dims = {_dims(out)};"]
        if "threshold" in op.arrays:
            threshold = self.constant(index, "threshold", "int32_t", op.arrays["threshold"])
            body.append(f"const esnn_conv_output output = {{{threshold}, NULL, {self.write(op.output)}}};")
        else:
            body.append(f"const esnn_conv_output output = {{NULL, {self.write(op.output)}, NULL}};")
        if op.attrs.get("binary_rows"):
            if source.kind != "bits":
                raise ExportError(f"export c: mixed layer {op.source!r} must read a spike map, not {source.kind}")
            packed, codes, rows = mixed_tables(weight, op.attrs["binary_rows"])
            binary_table = self.constant(index, "weight_binary", "uint32_t", packed) if packed.size else "NULL"
            int8_table = self.constant(index, "weight_int8", "int8_t", codes) if codes.size else "NULL"
            row_table = self.constant(index, "rows", "int16_t", rows)
            body.append(
                f"status = esnn_conv_mixed_bits(&params, &in_dims, {source.planes}, {self.read(source.name)}, {binary_table}, {int8_table}, {codes.shape[-1]}, {row_table}, "
                f"&out_dims, (int32_t *)(void *)(arena.bytes + {self.scratch}), &output);"
            )
        elif op.attrs["binary"]:
            if source.kind != "bits":
                raise ExportError(f"export c: binary layer {op.source!r} must read a spike map, not {source.kind}")
            packed = self.constant(index, "weight", "uint32_t", pack_signs(weight))
            body.append(f"status = esnn_conv_b1_bits(&params, &in_dims, {source.planes}, {self.read(source.name)}, {packed}, &out_dims, &output);")
        else:
            codes = self.constant(index, "weight", "int8_t", np.transpose(weight, (2, 3, 1, 0)))  # kh, kw, C, O: a row per input value
            if source.kind == "s16":
                body.append(f"status = esnn_conv_s8_s16(&params, &in_dims, {self.read(source.name)}, {codes}, &out_dims, (int32_t *)(void *)(arena.bytes + {self.scratch}), &output);")
            else:
                body.append(
                    f"status = esnn_conv_s8_bits(&params, &in_dims, {source.planes}, {self.read(source.name)}, {codes}, &out_dims, (int32_t *)(void *)(arena.bytes + {self.scratch}), &output);"
                )
        self.call(index, op, body + ["if (status != ESNN_OK) return status;"])

    def fire(self, index: int, op: Op) -> None:
        threshold = self.constant(index, "threshold", "int32_t", op.arrays["threshold"])
        body = [f"static const esnn_dims dims = {_dims(self.spec(op.output))};", f"status = esnn_fire_s32(&dims, {self.read(op.inputs[0])}, {threshold}, {self.write(op.output)});"]
        self.call(index, op, body + ["if (status != ESNN_OK) return status;"])

    def add_fire(self, index: int, op: Op) -> None:
        terms = []
        for term, name in enumerate(op.inputs):
            spec = self.spec(name)
            multiplier = self.constant(index, f"multiplier{term}", "int32_t", op.arrays[f"multiplier{term}"])
            if spec.kind == "s32":
                terms.append(f"{{{self.read(name)}, NULL, 0, {multiplier}}}")
            else:
                terms.append(f"{{NULL, {self.read(name)}, {spec.planes}, {multiplier}}}")
        threshold = self.constant(index, "threshold", "int64_t", op.arrays["threshold"])
        body = [
            f"static const esnn_dims dims = {_dims(self.spec(op.output))};",
            f"const esnn_add_term terms[{len(terms)}] = {{{', '.join(terms)}}};",
            f"status = esnn_add_fire(&dims, terms, {len(terms)}, {threshold}, {self.write(op.output)});",
        ]
        self.call(index, op, body + ["if (status != ESNN_OK) return status;"])

    def pool(self, index: int, op: Op) -> None:
        source, out = self.spec(op.inputs[0]), self.spec(op.output)
        k, s, p = op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"]
        body = [
            f"static const esnn_pool_params params = {{{k[0]}, {k[1]}, {s[0]}, {s[1]}, {p[0]}, {p[1]}}};",
            f"static const esnn_dims in_dims = {_dims(source)};",
            f"static const esnn_dims out_dims = {_dims(out)};",
        ]
        operation = "sumpool" if op.kind == "avgpool" else "maxpool"
        if source.kind == "s32":
            body.append(f"status = esnn_{operation}_s32(&params, &in_dims, {self.read(source.name)}, &out_dims, {self.write(out.name)});")
        elif operation == "sumpool":
            body.append(f"status = esnn_sumpool_bits(&params, &in_dims, {source.planes}, {self.read(source.name)}, &out_dims, {out.planes}, {self.write(out.name)});")
        else:
            body.append(f"status = esnn_maxpool_bits(&params, &in_dims, {source.planes}, {self.read(source.name)}, &out_dims, {self.write(out.name)});")
        self.call(index, op, body + ["if (status != ESNN_OK) return status;"])

    avgpool = pool
    maxpool = pool

    def pad(self, index: int, op: Op) -> None:
        source, out = self.spec(op.inputs[0]), self.spec(op.output)
        front, _, top, _, left, _ = op.attrs["pad"]
        body = [
            f"static const esnn_dims in_dims = {_dims(source)};",
            f"static const esnn_dims out_dims = {_dims(out)};",
            f"status = esnn_pad_bits(&in_dims, {source.planes}, {self.read(source.name)}, {front}, {top}, {left}, &out_dims, {self.write(out.name)});",
        ]
        self.call(index, op, body + ["if (status != ESNN_OK) return status;"])

    def slice(self, index: int, op: Op) -> None:
        source, out = self.spec(op.inputs[0]), self.spec(op.output)
        a = op.attrs
        body = [
            f"static const esnn_dims in_dims = {_dims(source)};",
            f"static const esnn_dims out_dims = {_dims(out)};",
            f"status = esnn_slice_bits(&in_dims, {source.planes}, {self.read(source.name)}, {a['axis']}, {a['start']}, {a['step']}, &out_dims, {self.write(out.name)});",
        ]
        self.call(index, op, body + ["if (status != ESNN_OK) return status;"])

    def cat(self, index: int, op: Op) -> None:
        out = self.spec(op.output)
        body = [f"static const esnn_dims out_dims = {_dims(out)};"]
        offset = 0
        for part, name in enumerate(op.inputs):
            source = self.spec(name)
            body.append(f"static const esnn_dims in_dims{part} = {_dims(source)};")
            body.append(f"status = esnn_cat_bits(&in_dims{part}, {source.planes}, {self.read(name)}, {offset}, &out_dims, {out.planes}, {self.write(out.name)});")
            body.append("if (status != ESNN_OK) return status;")
            offset += source.shape[0]
        self.call(index, op, body)

    def output(self, index: int, op: Op) -> None:
        source = self.spec(op.inputs[0])
        multiplier = self.constant(index, "multiplier", "int32_t", op.arrays["multiplier"])
        offset = self.constant(index, "offset", "int64_t", op.arrays["offset"])
        count = self.program.num_classes
        if source.kind == "s32":
            body = [f"status = esnn_output_s32({count}, {self.read(source.name)}, {multiplier}, {offset}, logits);"]
        else:
            body = [f"status = esnn_output_bits({count}, {source.planes}, {self.read(source.name)}, {multiplier}, {offset}, logits);"]
        self.call(index, op, body + ["if (status != ESNN_OK) return status;"])


def _model_header(program: Program, arena: int, stamp: str) -> str:
    channels, height, width = program.input_shape
    return f"""/* {stamp} */
#ifndef ESNN_MODEL_H
#define ESNN_MODEL_H

#include <stdint.h>

#include "esnn.h"

#define ESNN_MODEL_INPUT_CHANNELS {channels}
#define ESNN_MODEL_INPUT_HEIGHT {height}
#define ESNN_MODEL_INPUT_WIDTH {width}
#define ESNN_MODEL_INPUT_BYTES {channels * height * width}
#define ESNN_MODEL_CLASSES {program.num_classes}
#define ESNN_MODEL_ARENA_BYTES {max(arena, ALIGN)}
/** Real logit = ESNN_MODEL_LOGIT_SCALE * integer logit. */
#define ESNN_MODEL_LOGIT_SCALE {program.output_scale!r}

/**
 * @brief Run the network on one image.
 * @param[in]  pixels  uint8 pixels, channels first (C x H x W), as stored in the dataset
 * @param[out] logits  ESNN_MODEL_CLASSES int64 logits
 * @return ESNN_OK, or a kernel's error status
 */
esnn_status esnn_model_run(const uint8_t *pixels, int64_t *logits);

#endif /* ESNN_MODEL_H */
"""


def _model_source(program: Program, stamp: str) -> tuple[str, int]:
    offsets, arena, scratch = plan_arena(program)
    writer = _Writer(program, offsets, scratch)
    for index, op in enumerate(program.ops):
        getattr(writer, op.kind)(index, op)
    channels, height, width = program.input_shape
    table = _array("input_table", "int16_t", program.input_table)
    source = f"""/* {stamp} */
#include <stddef.h>
#include <stdint.h>

#include "esnn.h"
#include "esnn_model.h"

/* Every tensor lives in this arena at an offset planned at export; 8-byte aligned. */
static union {{
    uint64_t align;
    uint8_t bytes[ESNN_MODEL_ARENA_BYTES];
}} arena;

/* Normalised int16 value of each uint8 pixel, per input channel. */
{table}
{''.join(writer.constants)}
esnn_status esnn_model_run(const uint8_t *pixels, int64_t *logits)
{{
    esnn_status status;
    int32_t c, i;
    int16_t *image = (int16_t *)(arena.bytes + {offsets[program.input]});
    if (pixels == NULL || logits == NULL) {{
        return ESNN_ERROR_ARGUMENT;
    }}
    /* Channels-first pixels to the channels-last int16 image. */
    for (c = 0; c < {channels}; c++) {{
        for (i = 0; i < {height * width}; i++) {{
            image[i * {channels} + c] = input_table[c * 256 + pixels[c * {height * width} + i]];
        }}
    }}
{''.join(writer.calls)}    return ESNN_OK;
}}
"""
    return source, arena


HARNESS = r"""/* {stamp} */
/*
 * Host harness: reads raw images (ESNN_MODEL_INPUT_BYTES uint8 each, channels
 * first) from a file or stdin and prints one line of int64 logits per image.
 * With --repeat N every image runs N times and the mean time per inference
 * goes to stderr.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "esnn_model.h"

int main(int argc, char **argv)
{{
    static uint8_t pixels[ESNN_MODEL_INPUT_BYTES];
    int64_t logits[ESNN_MODEL_CLASSES];
    FILE *input = stdin;
    long repeat = 1, images = 0, r;
    int argi, c;
    clock_t spent = 0;
    for (argi = 1; argi < argc; argi++) {{
        if (strcmp(argv[argi], "--repeat") == 0 && argi + 1 < argc) {{
            repeat = strtol(argv[++argi], NULL, 10);
            if (repeat < 1) {{
                fprintf(stderr, "error: --repeat needs a positive count\n");
                return 2;
            }}
        }} else if (input == stdin) {{
            input = fopen(argv[argi], "rb");
            if (input == NULL) {{
                fprintf(stderr, "error: cannot open %s\n", argv[argi]);
                return 1;
            }}
        }} else {{
            fprintf(stderr, "usage: %s [--repeat N] [IMAGES.bin]\n", argv[0]);
            return 2;
        }}
    }}
    while (fread(pixels, 1, sizeof pixels, input) == sizeof pixels) {{
        clock_t started = clock();
        for (r = 0; r < repeat; r++) {{
            if (esnn_model_run(pixels, logits) != ESNN_OK) {{
                fprintf(stderr, "error: the model failed on image %ld\n", images);
                return 1;
            }}
        }}
        spent += clock() - started;
        for (c = 0; c < ESNN_MODEL_CLASSES; c++) {{
            printf(c ? " %lld" : "%lld", (long long)logits[c]);
        }}
        printf("\n");
        images++;
    }}
    if (repeat > 1 && images > 0) {{
        fprintf(stderr, "%.3f us per inference\n", 1e6 * (double)spent / CLOCKS_PER_SEC / (double)(images * repeat));
    }}
    return 0;
}}
"""

MAKEFILE = """# {stamp}
CC ?= cc
CFLAGS = -std=c99 -O2 -Wall -Wextra -Werror -pedantic
SOURCES = harness.c esnn_model.c esnn.c

harness: $(SOURCES) esnn.h esnn_model.h
\t$(CC) $(CFLAGS) -o $@ $(SOURCES)

# Runs the harness on the golden images (synthetic, from the build) and compares with the
# logits of edgesnn's integer reference, bit for bit.
check: harness
\t./harness golden_images.bin > golden_check.txt
\tcmp golden_check.txt golden_logits.txt && echo "golden logits: bit-exact"

clean:
\trm -f harness golden_check.txt

.PHONY: check clean
"""


def runtime_sources() -> dict[str, bytes]:
    """The kernels shipped in ``edgesnn.firmware_stubs``."""
    package = resources.files("edgesnn.firmware_stubs")
    return {name: package.joinpath(name).read_bytes() for name in RUNTIME_FILES}


def c_sources(program: Program, stamp: str) -> dict[str, bytes]:
    """Every file of the firmware folder, by name. ``stamp`` is the generated-by line (version, manifest)."""
    stamp = f"Generated by {stamp}. Do not edit."
    source, arena = _model_source(program, stamp)
    files = dict(runtime_sources())
    files["esnn_model.h"] = _model_header(program, arena, stamp).encode()
    files["esnn_model.c"] = source.encode()
    files["harness.c"] = HARNESS.format(stamp=stamp).encode()
    files["Makefile"] = MAKEFILE.format(stamp=stamp).encode()
    return files


def arena_bytes(program: Program) -> int:
    """Bytes of static RAM the model's arena takes (tensors and scratch)."""
    return plan_arena(program)[1]


def weight_bytes(program: Program) -> int:
    """Bytes of the constant tables of the C model: weights (1 bit or 1 byte each), thresholds, multipliers, the input table."""
    total = program.input_table.size * 2
    for op in program.ops:
        for key, array in op.arrays.items():
            if key == "weight" and op.attrs.get("binary_rows"):
                packed, codes, rows = mixed_tables(array, op.attrs["binary_rows"])
                total += packed.size * 4 + codes.size + rows.size * 2
            elif key == "weight" and op.attrs.get("binary"):
                total += pack_signs(array).size * 4
            elif key == "weight":
                total += array.size
            else:
                total += array.size * array.dtype.itemsize
    return total
