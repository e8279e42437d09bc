"""The crossbar readout in one pass: read noise, ADC, the sum over tiles, the bias, the IF neurons.

For every output of a tile (element g of the tile's N·H·W × trials × O partial sums,
in that order) the readout computes

    s = partial + σ_r·√max(variance, 0)·n_g,   q = clamp(rint(s), −L, L)·step,   total ← total + q (+ bias)

(no ADC: q = s), and after the last tile, when the layer feeds IF neurons at T = 1,
total ← a·[total ≥ θ′]. n_g ~ N(0, 1) comes from a counter-based generator: the normal
of global index g is component g mod 2 (r·cos φ, r·sin φ) of the Box–Muller pair ⌊g/2⌋,
whose two uniforms are the 32-bit halves of SplitMix64(key + ⌊g/2⌋·γ). A draw therefore
depends on the key and its index only: not on the thread count, how the rows are split,
or whether the compiled kernel or the torch operations compute it.

The kernel is C compiled with the system compiler (``cc``, about a second; the flags
select the host's vector instructions), so the per-element work and the noise run in one
vectorised pass instead of a pass each. The library is kept in a cache folder
(EDGESNN_CACHE_DIR, else $XDG_CACHE_HOME/edgesnn or ~/.cache/edgesnn; see ``native``) under a
key of the source, the compiler and the CPU, so each machine compiles it once rather than
every process; where the folder cannot be written, each process compiles its own. Without a
compiler, or with EDGESNN_NO_KERNEL=1, the same arithmetic runs as torch operations: the
same draws up to the last bits of log/cos/sin.
"""

from __future__ import annotations

import ctypes
import math
import os
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from . import native

GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (2^64 / golden ratio)
MIX = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)  # SplitMix64's finaliser multipliers
MIN_ROWS_PER_THREAD = 64  # rows below which the kernel runs on the calling thread alone

_SOURCE = r"""
#include <stdint.h>
#include <math.h>

#define PAIRS 256    /* Box-Muller pairs per generator block */
#define BUFFER 8192  /* normals buffered per row chunk */

/* The standard normals of global indices [begin, end) under key (see the module docstring):
   r = √(−2 ln u₁); φ = (q + f)·π/2 with the quadrant q and f ∈ [0, 1) from u₂; cos and sin of
   π/4 + x, x = (f − ½)·π/2 ∈ [−π/4, π/4), from their Taylor polynomials (error < 4·10⁻⁷).
   Pairs are computed in whole, aligned groups of 16 so that every pair takes the same vector
   path, whatever range asked for it. */
static void normals(float *restrict out, int64_t begin, int64_t end, uint64_t key) {
    float radius[PAIRS], pair[2 * PAIRS];
    uint32_t angle[PAIRS];
    for (int64_t first = (begin / 2) & ~(int64_t)15; 2 * first < end; first += PAIRS) {
        int64_t m = (end + 1) / 2 - first < PAIRS ? (((end + 1) / 2 - first + 15) & ~(int64_t)15) : PAIRS;
        for (int64_t j = 0; j < m; j++) {
            uint64_t z = key + (uint64_t)(first + j) * 0x9e3779b97f4a7c15ULL;
            z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
            z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
            z ^= z >> 31;
            radius[j] = ((float)(uint32_t)(z >> 32) + 0.5f) * 0x1p-32f;
            angle[j] = (uint32_t)z;
        }
        for (int64_t j = 0; j < m; j++) radius[j] = sqrtf(-2.0f * logf(radius[j]));
        for (int64_t j = 0; j < m; j++) {
            uint32_t q = angle[j] >> 30;
            float x = ((float)(angle[j] & 0x3fffffffu) * 0x1p-30f - 0.5f) * 1.57079632679489662f;
            float x2 = x * x;
            float s = x * (1.0f + x2 * (-1.0f / 6.0f + x2 * (1.0f / 120.0f + x2 * (-1.0f / 5040.0f))));
            float c = 1.0f + x2 * (-0.5f + x2 * (1.0f / 24.0f + x2 * (-1.0f / 720.0f + x2 * (1.0f / 40320.0f))));
            float sine = (s + c) * 0.707106781186547524f, cosine = (c - s) * 0.707106781186547524f;
            float a = (q & 1) ? sine : cosine, b = (q & 1) ? cosine : sine;  /* rotate by q quarter turns */
            pair[2 * j] = radius[j] * ((q == 1 || q == 2) ? -a : a);
            pair[2 * j + 1] = radius[j] * ((q >= 2) ? -b : b);
        }
        int64_t low = 2 * first > begin ? 2 * first : begin, high = 2 * (first + m) < end ? 2 * (first + m) : end;
        for (int64_t g = low; g < high; g++) out[g - begin] = pair[g - 2 * first];
    }
}

/* 1 where the readout splits its rows over OpenMP threads itself. */
int esnn_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

void esnn_normals(float *out, int64_t begin, int64_t end, uint64_t key) {
    for (int64_t start = begin; start < end; start += BUFFER)
        normals(out + (start - begin), start, end - start < BUFFER ? end : start + BUFFER, key);
}

/* One trial's O outputs of one row; the flags are constants where it is inlined, so each
   combination compiles to its own vectorised loop. */
static inline __attribute__((always_inline)) void readout_outputs(
    float *restrict out, const float *restrict in, const void *restrict var, const float *restrict noise,
    const float *restrict step, const float *restrict bias, const float *restrict threshold, const float *restrict amplitude,
    int64_t O, float sigma, float levels, const int noisy, const int half, const int adc, const int accumulate, const int fire) {
    for (int64_t o = 0; o < O; o++) {
        float s = in[o];
        if (noisy) {
            float v;
            if (half) {  /* bfloat16: the upper 16 bits of a float */
                uint32_t bits = (uint32_t)((const uint16_t *)var)[o] << 16;
                __builtin_memcpy(&v, &bits, 4);
            } else {
                v = ((const float *)var)[o];
            }
            s += sigma * sqrtf(fmaxf(v, 0.0f)) * noise[o];
        }
        if (adc) s = fminf(fmaxf(rintf(s), -levels), levels) * step[o];
        s += bias[o];
        if (accumulate) s += out[o];
        if (fire) s = s >= threshold[o] ? amplitude[o] : 0.0f;
        out[o] = s;
    }
}

#define READOUT_ROWS(NOISY, HALF, ADC, ACCUMULATE, FIRE)                                                             \
    _Pragma("omp parallel for schedule(static) if (row_end - row_begin >= 64)")                                      \
    for (int64_t p = row_begin; p < row_end; p++)                                                                    \
        for (int64_t k0 = 0; k0 < K; k0 += trials_per_chunk) {                                                       \
            float noise[BUFFER];                                                                                     \
            int64_t k1 = k0 + trials_per_chunk < K ? k0 + trials_per_chunk : K;                                      \
            if (NOISY) normals(noise, counter + (p * K + k0) * O, counter + (p * K + k1) * O, key);                  \
            for (int64_t k = k0; k < k1; k++)                                                                        \
                readout_outputs(total + (p * K + k) * O, partial + p * ps + k * pk,                                   \
                                (const char *)variance + (p * vs + k * vk) * (HALF ? 2 : 4), noise + (k - k0) * O,    \
                                step, bias, threshold, amplitude, O, sigma, levels, NOISY, HALF, ADC, ACCUMULATE, FIRE); \
        }

/* Rows [row_begin, row_end) of the readout (see the module docstring); element g = (p·K + k)·O + o
   of row p, trial k, output o draws the normal of index counter + g. bias (O values) is always
   added (zeros for none); threshold = NULL: no firing; half: the variance is bfloat16 (strides in its elements). */
void esnn_readout(float *total, const float *partial, int64_t ps, int64_t pk, const void *variance, int64_t vs, int64_t vk, int half,
                  const float *step, const float *bias, const float *threshold, const float *amplitude,
                  int64_t row_begin, int64_t row_end, int64_t K, int64_t O,
                  float sigma, float levels, int accumulate, uint64_t key, int64_t counter) {
    int64_t trials_per_chunk = BUFFER / O > 0 ? BUFFER / O : 1;
    int noisy = sigma != 0.0f, adc = levels != 0.0f, fire = threshold != 0;
    switch (noisy << 4 | (noisy && half) << 3 | adc << 2 | (accumulate != 0) << 1 | fire) {
        case 0: READOUT_ROWS(0, 0, 0, 0, 0) break;
        case 1: READOUT_ROWS(0, 0, 0, 0, 1) break;
        case 2: READOUT_ROWS(0, 0, 0, 1, 0) break;
        case 3: READOUT_ROWS(0, 0, 0, 1, 1) break;
        case 4: READOUT_ROWS(0, 0, 1, 0, 0) break;
        case 5: READOUT_ROWS(0, 0, 1, 0, 1) break;
        case 6: READOUT_ROWS(0, 0, 1, 1, 0) break;
        case 7: READOUT_ROWS(0, 0, 1, 1, 1) break;
        case 16: READOUT_ROWS(1, 0, 0, 0, 0) break;
        case 17: READOUT_ROWS(1, 0, 0, 0, 1) break;
        case 18: READOUT_ROWS(1, 0, 0, 1, 0) break;
        case 19: READOUT_ROWS(1, 0, 0, 1, 1) break;
        case 20: READOUT_ROWS(1, 0, 1, 0, 0) break;
        case 21: READOUT_ROWS(1, 0, 1, 0, 1) break;
        case 22: READOUT_ROWS(1, 0, 1, 1, 0) break;
        case 23: READOUT_ROWS(1, 0, 1, 1, 1) break;
        case 24: READOUT_ROWS(1, 1, 0, 0, 0) break;
        case 25: READOUT_ROWS(1, 1, 0, 0, 1) break;
        case 26: READOUT_ROWS(1, 1, 0, 1, 0) break;
        case 27: READOUT_ROWS(1, 1, 0, 1, 1) break;
        case 28: READOUT_ROWS(1, 1, 1, 0, 0) break;
        case 29: READOUT_ROWS(1, 1, 1, 0, 1) break;
        case 30: READOUT_ROWS(1, 1, 1, 1, 0) break;
        case 31: READOUT_ROWS(1, 1, 1, 1, 1) break;
    }
}
"""

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_compile_failed = False
_pools: dict[int, ThreadPoolExecutor] = {}


def _compile() -> ctypes.CDLL | None:
    """The kernel built for this machine (from the cache where it was built before), or None without a working C compiler."""
    compiler = native.compiler()
    if compiler is None:
        return None
    library = native.load("readout", compiler, (_SOURCE,), lambda path: _build(compiler, path))
    if library is None:
        return None
    library.esnn_normals.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint64]
    library.esnn_normals.restype = None
    library.esnn_openmp.restype = ctypes.c_int
    library.esnn_openmp.argtypes = []
    library.esnn_readout.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_float, ctypes.c_float, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64,
    ]
    library.esnn_readout.restype = None
    return library


def _build(compiler: str, path_so: str) -> bool:
    """Compile the kernel into ``path_so`` with the best flags the compiler takes; False where none works."""
    folder = os.path.dirname(path_so)
    path_c, path_o = os.path.join(folder, "readout.c"), os.path.join(folder, "readout.o")
    with open(path_c, "w") as handle:
        handle.write(_SOURCE)
    # -ffast-math for the compile only: it lets libmvec vectorise logf/cosf/sinf; linked
    # without it, so no startup code changes the process's floating-point (denormal) mode.
    # -fopenmp: the kernel's threads are torch's own (the same libgomp, already loaded).
    for flags in (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], []):
        compiled = subprocess.run([compiler, "-O3", *flags, "-ffast-math", "-fPIC", "-c", path_c, "-o", path_o], capture_output=True)
        openmp = ["-fopenmp"] if "-fopenmp" in flags else []
        if compiled.returncode == 0 and subprocess.run([compiler, "-shared", *openmp, path_o, "-o", path_so, "-lm"], capture_output=True).returncode == 0:
            return True
    return False


def kernel() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), or None where it cannot be built."""
    global _library, _compile_failed
    with _lock:
        if _library is None and not _compile_failed and os.environ.get("EDGESNN_NO_KERNEL") != "1":
            _library = _compile()
            _compile_failed = _library is None
        return _library


def mix64(value: int) -> int:
    """SplitMix64's finaliser on a Python int (for keys)."""
    value %= 2**64
    value = ((value ^ (value >> 30)) * MIX[0]) % 2**64
    value = ((value ^ (value >> 27)) * MIX[1]) % 2**64
    return value ^ (value >> 31)


def _signed(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


def reference_normals(begin: int, end: int, key: int) -> torch.Tensor:
    """The normals of global indices [begin, end) under ``key``, as torch operations."""
    first, last = begin // 2, (end + 1) // 2
    # int64 arithmetic wraps modulo 2^64 like the kernel's uint64; >> is arithmetic, so mask.
    z = torch.arange(first, last, dtype=torch.int64) * _signed(GAMMA) + _signed(key % 2**64)
    z = (z ^ ((z >> 30) & (2**34 - 1))) * _signed(MIX[0])
    z = (z ^ ((z >> 27) & (2**37 - 1))) * _signed(MIX[1])
    z = z ^ ((z >> 31) & (2**33 - 1))
    radius = (-2.0 * ((((z >> 32) & 0xFFFFFFFF).float() + 0.5) * 2**-32).log()).sqrt()
    quadrant = (z >> 30) & 3
    x = ((z & 0x3FFFFFFF).float() * 2**-30 - 0.5) * (math.pi / 2)
    x2 = x * x
    s = x * (1.0 + x2 * (-1.0 / 6.0 + x2 * (1.0 / 120.0 + x2 * (-1.0 / 5040.0))))
    c = 1.0 + x2 * (-0.5 + x2 * (1.0 / 24.0 + x2 * (-1.0 / 720.0 + x2 * (1.0 / 40320.0))))
    sine, cosine = (s + c) * math.sqrt(0.5), (c - s) * math.sqrt(0.5)
    odd = (quadrant & 1).bool()
    a, b = torch.where(odd, sine, cosine), torch.where(odd, cosine, sine)
    a = torch.where((quadrant == 1) | (quadrant == 2), -a, a)
    b = torch.where(quadrant >= 2, -b, b)
    pairs = torch.stack([radius * a, radius * b], dim=1).reshape(-1)
    return pairs[begin - 2 * first : end - 2 * first]


def normals(begin: int, end: int, key: int) -> torch.Tensor:
    """The normals of global indices [begin, end) under ``key`` (compiled where possible)."""
    library = kernel()
    if library is None:
        return reference_normals(begin, end, key)
    out = torch.empty(end - begin)
    library.esnn_normals(out.data_ptr(), begin, end, key)
    return out


def _rows(tensor: torch.Tensor, trials: int, outputs: int) -> torch.Tensor:
    """N × trials·O × … (or N × O × …, shared by the trials) → rows × trials × O, a view where possible."""
    rows = tensor.movedim(1, -1).reshape(-1, tensor.shape[1])
    if tensor.shape[1] == outputs and trials > 1:
        return rows.unsqueeze(1).expand(rows.shape[0], trials, outputs)
    return rows.reshape(rows.shape[0], trials, outputs)


def readout(
    total: torch.Tensor | None,
    partial: torch.Tensor,
    variance: torch.Tensor | None,
    trials: int,
    outputs: int,
    key: int,
    counter: int,
    sigma: float,
    levels: int,
    step: torch.Tensor | None,
    bias: torch.Tensor | None,
    fire: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``total`` (None: zeros) plus the readout of one tile, as a rows × trials·O tensor.

    ``fire`` = (θ′, a) per output: the sum then goes through the next layer's IF neurons at
    T = 1, total ← a·[total ≥ θ′] (the last tile only).

    ``partial`` and ``variance`` are N × trials·O × H × W (or × O ×, shared by the trials;
    any strides, channels-last best) or already rows × trials × O views; ``variance`` is
    read only when ``sigma`` > 0, ``step`` only when ``levels`` > 0. The draws take the
    indices counter … counter + rows·trials·O − 1.
    """
    partial_rows = partial if partial.dim() == 3 else _rows(partial, trials, outputs)
    rows = partial_rows.shape[0]
    noisy = sigma > 0
    variance_rows = (variance if variance.dim() == 3 else _rows(variance, trials, outputs)) if noisy else partial_rows
    if partial_rows.stride(2) != 1:
        partial_rows = partial_rows.contiguous()
    if variance_rows.stride(2) != 1:
        variance_rows = variance_rows.contiguous()
    step = torch.ones(outputs) if step is None else step.contiguous().float()
    bias = torch.zeros(outputs) if bias is None else bias.contiguous().float()
    fire = None if fire is None else tuple(value.contiguous().float() for value in fire)
    out = torch.empty(rows, trials * outputs) if total is None else total
    library = kernel()
    if library is None:
        values = partial_rows
        if noisy:
            noise = reference_normals(counter, counter + rows * trials * outputs, key).reshape(rows, trials, outputs)
            values = values + sigma * variance_rows.float().clamp_min(0).sqrt() * noise
        if levels > 0:
            values = values.round().clamp(-levels, levels) * step
        values = (values + bias).reshape(rows, -1)
        out = out.copy_(values) if total is None else out.add_(values)
        if fire is not None:
            threshold, amplitude = (value.repeat(trials) for value in fire)
            out = out.ge_(threshold).mul_(amplitude)
        return out
    arguments = (
        partial_rows.data_ptr(), partial_rows.stride(0), partial_rows.stride(1),
        variance_rows.data_ptr(), variance_rows.stride(0), variance_rows.stride(1), int(noisy and variance_rows.dtype == torch.bfloat16),
        step.data_ptr(), bias.data_ptr(),
        *((None, None) if fire is None else (fire[0].data_ptr(), fire[1].data_ptr())),
    )
    tail = (trials, outputs, float(sigma), float(levels), int(total is not None), key % 2**64, counter)

    def run(span: tuple[int, int]) -> None:
        library.esnn_readout(out.data_ptr(), *arguments, span[0], span[1], *tail)

    threads = 1 if library.esnn_openmp() else max(1, min(torch.get_num_threads(), rows // MIN_ROWS_PER_THREAD))
    if threads == 1:
        run((0, rows))
    else:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="edgesnn-readout")
        bounds = [rows * part // threads for part in range(threads + 1)]
        list(_pools[threads].map(run, zip(bounds[:-1], bounds[1:])))
    return out
