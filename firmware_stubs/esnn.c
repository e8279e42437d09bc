/* edgesnn C99 runtime: kernels declared and documented in esnn.h. */
#include "esnn.h"

#include <stddef.h>

static int32_t popcount32(uint32_t x)
{
#if defined(__GNUC__) && (defined(__POPCNT__) || defined(__ARM_FEATURE_SIMD32))
    return (int32_t)__builtin_popcount(x);
#else
    /* Without a popcount instruction the builtin becomes a library call; this is branch-free and inline. */
    x = x - ((x >> 1) & 0x55555555u);
    x = (x & 0x33333333u) + ((x >> 2) & 0x33333333u);
    x = (x + (x >> 4)) & 0x0F0F0F0Fu;
    return (int32_t)((x * 0x01010101u) >> 24);
#endif
}

/* Index of the lowest set bit of a non-zero word. */
static int32_t lowest_bit(uint32_t x)
{
#if defined(__GNUC__)
    return (int32_t)__builtin_ctz(x);
#else
    int32_t n = 0;
    while ((x & 1u) == 0u) {
        x >>= 1;
        n++;
    }
    return n;
#endif
}

static int dims_valid(const esnn_dims *dims)
{
    return dims != NULL && dims->c > 0 && dims->h > 0 && dims->w > 0;
}

static int32_t plane_words(const esnn_dims *dims)
{
    return dims->h * dims->w * ESNN_WORDS(dims->c);
}

/* Value of channel c at pixel (h * w + x) of a bit map, assembled from its planes. */
static int32_t bits_get(const uint32_t *map, const esnn_dims *dims, int32_t planes, int32_t pixel, int32_t c)
{
    const int32_t words = ESNN_WORDS(dims->c);
    const int32_t stride = plane_words(dims);
    const uint32_t *word = map + pixel * words + (c >> 5);
    int32_t value = 0;
    int32_t p;
    for (p = 0; p < planes; p++) {
        value |= (int32_t)((word[p * stride] >> (c & 31)) & 1u) << p;
    }
    return value;
}

/* Set bit c of a pixel in every plane to the bits of value; the map must start zeroed. */
static void bits_put(uint32_t *map, const esnn_dims *dims, int32_t planes, int32_t pixel, int32_t c, int32_t value)
{
    const int32_t words = ESNN_WORDS(dims->c);
    const int32_t stride = plane_words(dims);
    uint32_t *word = map + pixel * words + (c >> 5);
    int32_t p;
    for (p = 0; p < planes; p++) {
        word[p * stride] |= (uint32_t)((value >> p) & 1) << (c & 31);
    }
}

static void bits_clear(uint32_t *map, const esnn_dims *dims, int32_t planes)
{
    const int32_t total = plane_words(dims) * planes;
    int32_t i;
    for (i = 0; i < total; i++) {
        map[i] = 0u;
    }
}

static int conv_valid(const esnn_conv_params *params, const esnn_dims *in_dims, const esnn_dims *out_dims, const esnn_conv_output *output)
{
    if (params == NULL || output == NULL || !dims_valid(in_dims) || !dims_valid(out_dims)) {
        return 0;
    }
    if (params->kernel_h < 1 || params->kernel_w < 1 || params->stride_h < 1 || params->stride_w < 1 || params->pad_h < 0 || params->pad_w < 0) {
        return 0;
    }
    if (out_dims->h != (in_dims->h + 2 * params->pad_h - params->kernel_h) / params->stride_h + 1 ||
        out_dims->w != (in_dims->w + 2 * params->pad_w - params->kernel_w) / params->stride_w + 1) {
        return 0;
    }
    return output->thresholds != NULL ? output->spikes != NULL : output->accumulators != NULL;
}

/* Write one output channel's accumulator: keep it, or fire into a zeroed spike map. */
static void conv_write(const esnn_conv_output *output, const esnn_dims *out_dims, int32_t pixel, int32_t channel, int32_t acc)
{
    if (output->thresholds == NULL) {
        output->accumulators[pixel * out_dims->c + channel] = acc;
    } else if (acc >= output->thresholds[channel]) {
        output->spikes[pixel * ESNN_WORDS(out_dims->c) + (channel >> 5)] |= 1u << (channel & 31);
    }
}

static void acc_clear(int32_t *acc, int32_t count)
{
    int32_t o;
    for (o = 0; o < count; o++) {
        acc[o] = 0;
    }
}

/* Write every output channel of one pixel from the accumulator buffer. */
static void acc_write(const esnn_conv_output *output, const esnn_dims *out_dims, int32_t pixel, const int32_t *acc)
{
    int32_t o;
    for (o = 0; o < out_dims->c; o++) {
        conv_write(output, out_dims, pixel, o, acc[o]);
    }
}

static void conv_clear(const esnn_conv_output *output, const esnn_dims *out_dims)
{
    if (output->thresholds != NULL) {
        bits_clear(output->spikes, out_dims, 1);
    }
}

int32_t esnn_conv_s8_s16_get_buffer_size(const esnn_dims *out_dims)
{
    if (!dims_valid(out_dims)) {
        return 0;
    }
    return out_dims->c * (int32_t)sizeof(int32_t);
}

esnn_status esnn_conv_s8_s16(const esnn_conv_params *params, const esnn_dims *in_dims, const int16_t *input,
                             const int8_t *weights, const esnn_dims *out_dims, int32_t *buffer, const esnn_conv_output *output)
{
    int32_t oy, ox, o, ky, kx, c;
    if (!conv_valid(params, in_dims, out_dims, output) || input == NULL || weights == NULL || buffer == NULL) {
        return ESNN_ERROR_ARGUMENT;
    }
    conv_clear(output, out_dims);
    for (oy = 0; oy < out_dims->h; oy++) {
        for (ox = 0; ox < out_dims->w; ox++) {
            int32_t *acc = buffer;
            acc_clear(acc, out_dims->c);
            /* Each input value scales one contiguous weight row (output channel fastest). */
            for (ky = 0; ky < params->kernel_h; ky++) {
                const int32_t iy = oy * params->stride_h - params->pad_h + ky;
                if (iy < 0 || iy >= in_dims->h) {
                    continue;
                }
                for (kx = 0; kx < params->kernel_w; kx++) {
                    const int32_t ix = ox * params->stride_w - params->pad_w + kx;
                    const int16_t *x;
                    const int8_t *tap;
                    if (ix < 0 || ix >= in_dims->w) {
                        continue;
                    }
                    x = input + (iy * in_dims->w + ix) * in_dims->c;
                    tap = weights + (ky * params->kernel_w + kx) * in_dims->c * out_dims->c;
                    for (c = 0; c < in_dims->c; c++) {
                        const int32_t value = x[c];
                        const int8_t *row = tap + c * out_dims->c;
                        if (value == 0) {
                            continue;
                        }
                        for (o = 0; o < out_dims->c; o++) {
                            acc[o] += (int32_t)row[o] * value;
                        }
                    }
                }
            }
            acc_write(output, out_dims, oy * out_dims->w + ox, acc);
        }
    }
    return ESNN_OK;
}

int32_t esnn_conv_s8_bits_get_buffer_size(const esnn_dims *out_dims)
{
    if (!dims_valid(out_dims)) {
        return 0;
    }
    return out_dims->c * (int32_t)sizeof(int32_t);
}

/* Event-driven int8 sums over the window at (oy, ox): only the set bits add their weight row (``columns``
   int8, contiguous, [kh][kw][in][columns]), shifted by the bit's plane. Silent inputs cost nothing. */
static void window_s8_bits(const esnn_conv_params *params, const esnn_dims *in_dims, int32_t planes, const uint32_t *input,
                           const int8_t *weights, int32_t columns, int32_t oy, int32_t ox, int32_t *acc)
{
    const int32_t words = ESNN_WORDS(in_dims->c);
    const int32_t stride = plane_words(in_dims);
    int32_t ky, kx, p, j, o;
    acc_clear(acc, columns);
    for (ky = 0; ky < params->kernel_h; ky++) {
        const int32_t iy = oy * params->stride_h - params->pad_h + ky;
        if (iy < 0 || iy >= in_dims->h) {
            continue;
        }
        for (kx = 0; kx < params->kernel_w; kx++) {
            const int32_t ix = ox * params->stride_w - params->pad_w + kx;
            const int8_t *tap;
            if (ix < 0 || ix >= in_dims->w) {
                continue;
            }
            tap = weights + (ky * params->kernel_w + kx) * in_dims->c * columns;
            for (p = 0; p < planes; p++) {
                const uint32_t *x = input + p * stride + (iy * in_dims->w + ix) * words;
                for (j = 0; j < words; j++) {
                    uint32_t bits = x[j];
                    while (bits != 0u) {
                        const int32_t c = j * 32 + lowest_bit(bits);
                        const int8_t *row = tap + c * columns;
                        bits &= bits - 1u;
                        for (o = 0; o < columns; o++) {
                            acc[o] += (int32_t)row[o] * (1 << p);
                        }
                    }
                }
            }
        }
    }
}

/* The window at (oy, ox) against bit-packed signs (``sign_row``: [kh][kw][words] of one output channel):
   sum of x where w = +1 when ``sign_row`` is given, else the sum of all x (shared by every output). */
static int32_t window_b1_bits(const esnn_conv_params *params, const esnn_dims *in_dims, int32_t planes, const uint32_t *input,
                              const uint32_t *sign_row, int32_t oy, int32_t ox)
{
    const int32_t words = ESNN_WORDS(in_dims->c);
    const int32_t stride = plane_words(in_dims);
    int32_t ky, kx, p, j, sum = 0;
    for (ky = 0; ky < params->kernel_h; ky++) {
        const int32_t iy = oy * params->stride_h - params->pad_h + ky;
        if (iy < 0 || iy >= in_dims->h) {
            continue;
        }
        for (kx = 0; kx < params->kernel_w; kx++) {
            const int32_t ix = ox * params->stride_w - params->pad_w + kx;
            const uint32_t *w = sign_row == NULL ? NULL : sign_row + (ky * params->kernel_w + kx) * words;
            if (ix < 0 || ix >= in_dims->w) {
                continue;
            }
            for (p = 0; p < planes; p++) {
                const uint32_t *x = input + p * stride + (iy * in_dims->w + ix) * words;
                for (j = 0; j < words; j++) {
                    sum += popcount32(w == NULL ? x[j] : (w[j] & x[j])) << p;
                }
            }
        }
    }
    return sum;
}

esnn_status esnn_conv_s8_bits(const esnn_conv_params *params, const esnn_dims *in_dims, int32_t planes, const uint32_t *input,
                              const int8_t *weights, const esnn_dims *out_dims, int32_t *buffer, const esnn_conv_output *output)
{
    int32_t oy, ox;
    if (!conv_valid(params, in_dims, out_dims, output) || input == NULL || weights == NULL || buffer == NULL || planes < 1 || planes > 16) {
        return ESNN_ERROR_ARGUMENT;
    }
    conv_clear(output, out_dims);
    for (oy = 0; oy < out_dims->h; oy++) {
        for (ox = 0; ox < out_dims->w; ox++) {
            window_s8_bits(params, in_dims, planes, input, weights, out_dims->c, oy, ox, buffer);
            acc_write(output, out_dims, oy * out_dims->w + ox, buffer);
        }
    }
    return ESNN_OK;
}

esnn_status esnn_conv_b1_bits(const esnn_conv_params *params, const esnn_dims *in_dims, int32_t planes, const uint32_t *input,
                              const uint32_t *weights, const esnn_dims *out_dims, const esnn_conv_output *output)
{
    int32_t oy, ox, o, row_words;
    if (!conv_valid(params, in_dims, out_dims, output) || input == NULL || weights == NULL || planes < 1 || planes > 16) {
        return ESNN_ERROR_ARGUMENT;
    }
    row_words = params->kernel_h * params->kernel_w * ESNN_WORDS(in_dims->c);
    conv_clear(output, out_dims);
    for (oy = 0; oy < out_dims->h; oy++) {
        for (ox = 0; ox < out_dims->w; ox++) {
            /* sum_c (+-1) x_c = 2 (sum of x where w = +1) - (sum of x): the second term is shared by all outputs. */
            const int32_t total = window_b1_bits(params, in_dims, planes, input, NULL, oy, ox);
            for (o = 0; o < out_dims->c; o++) {
                const int32_t positive = window_b1_bits(params, in_dims, planes, input, weights + o * row_words, oy, ox);
                conv_write(output, out_dims, oy * out_dims->w + ox, o, 2 * positive - total);
            }
        }
    }
    return ESNN_OK;
}

int32_t esnn_conv_mixed_bits_get_buffer_size(const esnn_dims *out_dims)
{
    return esnn_conv_s8_bits_get_buffer_size(out_dims);
}

esnn_status esnn_conv_mixed_bits(const esnn_conv_params *params, const esnn_dims *in_dims, int32_t planes, const uint32_t *input,
                                 const uint32_t *binary_weights, const int8_t *int8_weights, int32_t int8_channels, const int16_t *rows,
                                 const esnn_dims *out_dims, int32_t *buffer, const esnn_conv_output *output)
{
    int32_t oy, ox, o, row_words;
    if (!conv_valid(params, in_dims, out_dims, output) || input == NULL || rows == NULL || buffer == NULL || planes < 1 || planes > 16 ||
        int8_channels < 0 || int8_channels > out_dims->c || (int8_channels > 0 && int8_weights == NULL) || (int8_channels < out_dims->c && binary_weights == NULL)) {
        return ESNN_ERROR_ARGUMENT;
    }
    for (o = 0; o < out_dims->c; o++) {
        if (rows[o] >= int8_channels || -rows[o] - 1 >= out_dims->c - int8_channels) {
            return ESNN_ERROR_ARGUMENT;
        }
    }
    row_words = params->kernel_h * params->kernel_w * ESNN_WORDS(in_dims->c);
    conv_clear(output, out_dims);
    for (oy = 0; oy < out_dims->h; oy++) {
        for (ox = 0; ox < out_dims->w; ox++) {
            const int32_t total = int8_channels < out_dims->c ? window_b1_bits(params, in_dims, planes, input, NULL, oy, ox) : 0;
            window_s8_bits(params, in_dims, planes, input, int8_weights, int8_channels, oy, ox, buffer);
            for (o = 0; o < out_dims->c; o++) {
                int32_t acc;
                if (rows[o] >= 0) {
                    acc = buffer[rows[o]];
                } else {
                    acc = 2 * window_b1_bits(params, in_dims, planes, input, binary_weights + (-rows[o] - 1) * row_words, oy, ox) - total;
                }
                conv_write(output, out_dims, oy * out_dims->w + ox, o, acc);
            }
        }
    }
    return ESNN_OK;
}

esnn_status esnn_fire_s32(const esnn_dims *dims, const int32_t *input, const int32_t *thresholds, uint32_t *spikes)
{
    int32_t pixel, c;
    if (!dims_valid(dims) || input == NULL || thresholds == NULL || spikes == NULL) {
        return ESNN_ERROR_ARGUMENT;
    }
    bits_clear(spikes, dims, 1);
    for (pixel = 0; pixel < dims->h * dims->w; pixel++) {
        for (c = 0; c < dims->c; c++) {
            if (input[pixel * dims->c + c] >= thresholds[c]) {
                bits_put(spikes, dims, 1, pixel, c, 1);
            }
        }
    }
    return ESNN_OK;
}

esnn_status esnn_add_fire(const esnn_dims *dims, const esnn_add_term *terms, int32_t count, const int64_t *thresholds, uint32_t *spikes)
{
    int32_t pixel, c, t;
    if (!dims_valid(dims) || terms == NULL || count < 1 || thresholds == NULL || spikes == NULL) {
        return ESNN_ERROR_ARGUMENT;
    }
    for (t = 0; t < count; t++) {
        if (terms[t].multipliers == NULL || (terms[t].accumulators == NULL && (terms[t].bits == NULL || terms[t].planes < 1 || terms[t].planes > 16))) {
            return ESNN_ERROR_ARGUMENT;
        }
    }
    bits_clear(spikes, dims, 1);
    for (pixel = 0; pixel < dims->h * dims->w; pixel++) {
        for (c = 0; c < dims->c; c++) {
            int64_t total = 0;
            for (t = 0; t < count; t++) {
                const int32_t value = terms[t].accumulators != NULL ? terms[t].accumulators[pixel * dims->c + c]
                                                                    : bits_get(terms[t].bits, dims, terms[t].planes, pixel, c);
                total += (int64_t)terms[t].multipliers[c] * (int64_t)value;
            }
            if (total >= thresholds[c]) {
                bits_put(spikes, dims, 1, pixel, c, 1);
            }
        }
    }
    return ESNN_OK;
}

static int pool_valid(const esnn_pool_params *params, const esnn_dims *in_dims, const esnn_dims *out_dims)
{
    if (params == NULL || !dims_valid(in_dims) || !dims_valid(out_dims) || out_dims->c != in_dims->c) {
        return 0;
    }
    if (params->kernel_h < 1 || params->kernel_w < 1 || params->stride_h < 1 || params->stride_w < 1 || params->pad_h < 0 || params->pad_w < 0) {
        return 0;
    }
    return out_dims->h == (in_dims->h + 2 * params->pad_h - params->kernel_h) / params->stride_h + 1 &&
           out_dims->w == (in_dims->w + 2 * params->pad_w - params->kernel_w) / params->stride_w + 1;
}

/* Sum (max = 0) or maximum (max = 1) of a window of a bit map or of accumulators. */
static int32_t pool_window(const esnn_pool_params *params, const esnn_dims *in_dims, int32_t planes, const uint32_t *bits, const int32_t *acc,
                           int32_t oy, int32_t ox, int32_t c, int max)
{
    int32_t result = 0;
    int any = 0;
    int32_t ky, kx;
    for (ky = 0; ky < params->kernel_h; ky++) {
        const int32_t iy = oy * params->stride_h - params->pad_h + ky;
        if (iy < 0 || iy >= in_dims->h) {
            continue;
        }
        for (kx = 0; kx < params->kernel_w; kx++) {
            const int32_t ix = ox * params->stride_w - params->pad_w + kx;
            int32_t value;
            if (ix < 0 || ix >= in_dims->w) {
                continue;
            }
            value = acc != NULL ? acc[(iy * in_dims->w + ix) * in_dims->c + c] : bits_get(bits, in_dims, planes, iy * in_dims->w + ix, c);
            if (!max) {
                result += value;
            } else if (!any || value > result) {
                result = value;
            }
            any = 1;
        }
    }
    return result;
}

esnn_status esnn_sumpool_bits(const esnn_pool_params *params, const esnn_dims *in_dims, int32_t in_planes, const uint32_t *input,
                              const esnn_dims *out_dims, int32_t out_planes, uint32_t *output)
{
    int32_t oy, ox, c;
    if (!pool_valid(params, in_dims, out_dims) || input == NULL || output == NULL || in_planes < 1 || out_planes < in_planes || out_planes > 16) {
        return ESNN_ERROR_ARGUMENT;
    }
    bits_clear(output, out_dims, out_planes);
    for (oy = 0; oy < out_dims->h; oy++) {
        for (ox = 0; ox < out_dims->w; ox++) {
            for (c = 0; c < out_dims->c; c++) {
                bits_put(output, out_dims, out_planes, oy * out_dims->w + ox, c, pool_window(params, in_dims, in_planes, input, NULL, oy, ox, c, 0));
            }
        }
    }
    return ESNN_OK;
}

esnn_status esnn_sumpool_s32(const esnn_pool_params *params, const esnn_dims *in_dims, const int32_t *input,
                             const esnn_dims *out_dims, int32_t *output)
{
    int32_t oy, ox, c;
    if (!pool_valid(params, in_dims, out_dims) || input == NULL || output == NULL || params->pad_h != 0 || params->pad_w != 0) {
        return ESNN_ERROR_ARGUMENT;
    }
    for (oy = 0; oy < out_dims->h; oy++) {
        for (ox = 0; ox < out_dims->w; ox++) {
            for (c = 0; c < out_dims->c; c++) {
                output[(oy * out_dims->w + ox) * out_dims->c + c] = pool_window(params, in_dims, 1, NULL, input, oy, ox, c, 0);
            }
        }
    }
    return ESNN_OK;
}

esnn_status esnn_maxpool_bits(const esnn_pool_params *params, const esnn_dims *in_dims, int32_t planes, const uint32_t *input,
                              const esnn_dims *out_dims, uint32_t *output)
{
    int32_t oy, ox, c;
    if (!pool_valid(params, in_dims, out_dims) || input == NULL || output == NULL || planes < 1 || planes > 16) {
        return ESNN_ERROR_ARGUMENT;
    }
    bits_clear(output, out_dims, planes);
    for (oy = 0; oy < out_dims->h; oy++) {
        for (ox = 0; ox < out_dims->w; ox++) {
            for (c = 0; c < out_dims->c; c++) {
                bits_put(output, out_dims, planes, oy * out_dims->w + ox, c, pool_window(params, in_dims, planes, input, NULL, oy, ox, c, 1));
            }
        }
    }
    return ESNN_OK;
}

esnn_status esnn_maxpool_s32(const esnn_pool_params *params, const esnn_dims *in_dims, const int32_t *input,
                             const esnn_dims *out_dims, int32_t *output)
{
    int32_t oy, ox, c;
    if (!pool_valid(params, in_dims, out_dims) || input == NULL || output == NULL) {
        return ESNN_ERROR_ARGUMENT;
    }
    for (oy = 0; oy < out_dims->h; oy++) {
        for (ox = 0; ox < out_dims->w; ox++) {
            for (c = 0; c < out_dims->c; c++) {
                output[(oy * out_dims->w + ox) * out_dims->c + c] = pool_window(params, in_dims, 1, NULL, input, oy, ox, c, 1);
            }
        }
    }
    return ESNN_OK;
}

esnn_status esnn_pad_bits(const esnn_dims *in_dims, int32_t planes, const uint32_t *input, int32_t front, int32_t top, int32_t left,
                          const esnn_dims *out_dims, uint32_t *output)
{
    int32_t y, x, c;
    if (!dims_valid(in_dims) || !dims_valid(out_dims) || input == NULL || output == NULL || planes < 1 || planes > 16 || front < 0 || top < 0 || left < 0 ||
        out_dims->c < in_dims->c + front || out_dims->h < in_dims->h + top || out_dims->w < in_dims->w + left) {
        return ESNN_ERROR_ARGUMENT;
    }
    bits_clear(output, out_dims, planes);
    for (y = 0; y < in_dims->h; y++) {
        for (x = 0; x < in_dims->w; x++) {
            for (c = 0; c < in_dims->c; c++) {
                const int32_t value = bits_get(input, in_dims, planes, y * in_dims->w + x, c);
                bits_put(output, out_dims, planes, (y + top) * out_dims->w + x + left, c + front, value);
            }
        }
    }
    return ESNN_OK;
}

esnn_status esnn_slice_bits(const esnn_dims *in_dims, int32_t planes, const uint32_t *input, int32_t axis, int32_t start, int32_t step,
                            const esnn_dims *out_dims, uint32_t *output)
{
    int32_t y, x, c;
    if (!dims_valid(in_dims) || !dims_valid(out_dims) || input == NULL || output == NULL || planes < 1 || planes > 16 || axis < 0 || axis > 2 ||
        start < 0 || step < 1) {
        return ESNN_ERROR_ARGUMENT;
    }
    if ((axis == 0 ? start + step * (out_dims->c - 1) >= in_dims->c : out_dims->c != in_dims->c) ||
        (axis == 1 ? start + step * (out_dims->h - 1) >= in_dims->h : out_dims->h != in_dims->h) ||
        (axis == 2 ? start + step * (out_dims->w - 1) >= in_dims->w : out_dims->w != in_dims->w)) {
        return ESNN_ERROR_ARGUMENT;
    }
    bits_clear(output, out_dims, planes);
    for (y = 0; y < out_dims->h; y++) {
        for (x = 0; x < out_dims->w; x++) {
            for (c = 0; c < out_dims->c; c++) {
                const int32_t sy = axis == 1 ? start + step * y : y;
                const int32_t sx = axis == 2 ? start + step * x : x;
                const int32_t sc = axis == 0 ? start + step * c : c;
                bits_put(output, out_dims, planes, y * out_dims->w + x, c, bits_get(input, in_dims, planes, sy * in_dims->w + sx, sc));
            }
        }
    }
    return ESNN_OK;
}

esnn_status esnn_cat_bits(const esnn_dims *in_dims, int32_t in_planes, const uint32_t *input, int32_t offset,
                          const esnn_dims *out_dims, int32_t out_planes, uint32_t *output)
{
    int32_t pixel, c;
    if (!dims_valid(in_dims) || !dims_valid(out_dims) || input == NULL || output == NULL || in_planes < 1 || out_planes < in_planes || out_planes > 16 ||
        offset < 0 || offset + in_dims->c > out_dims->c || in_dims->h != out_dims->h || in_dims->w != out_dims->w) {
        return ESNN_ERROR_ARGUMENT;
    }
    /* The caller zeroes the output once (offset 0 does it); later parts only add their channels. */
    if (offset == 0) {
        bits_clear(output, out_dims, out_planes);
    }
    for (pixel = 0; pixel < in_dims->h * in_dims->w; pixel++) {
        for (c = 0; c < in_dims->c; c++) {
            bits_put(output, out_dims, out_planes, pixel, c + offset, bits_get(input, in_dims, in_planes, pixel, c));
        }
    }
    return ESNN_OK;
}

esnn_status esnn_output_s32(int32_t count, const int32_t *input, const int32_t *multipliers, const int64_t *offsets, int64_t *logits)
{
    int32_t c;
    if (count < 1 || input == NULL || multipliers == NULL || offsets == NULL || logits == NULL) {
        return ESNN_ERROR_ARGUMENT;
    }
    for (c = 0; c < count; c++) {
        logits[c] = (int64_t)input[c] * (int64_t)multipliers[c] + offsets[c];
    }
    return ESNN_OK;
}

esnn_status esnn_output_bits(int32_t count, int32_t planes, const uint32_t *input, const int32_t *multipliers, const int64_t *offsets, int64_t *logits)
{
    esnn_dims dims;
    int32_t c;
    if (count < 1 || planes < 1 || planes > 16 || input == NULL || multipliers == NULL || offsets == NULL || logits == NULL) {
        return ESNN_ERROR_ARGUMENT;
    }
    dims.c = count;
    dims.h = 1;
    dims.w = 1;
    for (c = 0; c < count; c++) {
        logits[c] = (int64_t)bits_get(input, &dims, planes, 0, c) * (int64_t)multipliers[c] + offsets[c];
    }
    return ESNN_OK;
}
