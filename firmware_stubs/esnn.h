/*
 * edgesnn C99 runtime: integer kernels of one-timestep spiking networks.
 *
 * Tensors of one sample are stored channels-last (HWC).
 *  - int16 image: int16_t[h][w][c].
 *  - accumulators: int32_t[h][w][c].
 *  - bit maps: unsigned values held in `planes` bit planes. Plane p is
 *    uint32_t[h][w][words] with words = ESNN_WORDS(c); bit (c % 32) of word
 *    (c / 32) is bit p of channel c's value. A spike map has one plane; a
 *    pooled spike map holds window sums in a few planes. Bits of channels
 *    beyond c (padding of the last word) are always zero.
 *
 * Weights are laid out [out][kernel_h][kernel_w][in]: int8 values, or for a
 * binary layer bit-packed like a bit map (bit 1 = +1, bit 0 = -1), one
 * ESNN_WORDS(in)-word row per tap.
 *
 * No kernel allocates memory or prints. Every kernel checks its arguments
 * first and returns ESNN_ERROR_ARGUMENT without writing when they are invalid.
 */
#ifndef ESNN_H
#define ESNN_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Words of 32 bits that hold one bit per channel. */
#define ESNN_WORDS(channels) (((channels) + 31) / 32)

/** Kernel status. */
typedef enum {
    ESNN_OK = 0,              /**< done */
    ESNN_ERROR_ARGUMENT = -1  /**< a NULL pointer, a non-positive size or an inconsistent shape */
} esnn_status;

/** Shape of one sample's tensor. */
typedef struct {
    int32_t c; /**< channels */
    int32_t h; /**< height */
    int32_t w; /**< width */
} esnn_dims;

/** Convolution (a linear layer is a convolution whose kernel covers its whole input). */
typedef struct {
    int32_t kernel_h, kernel_w; /**< kernel size */
    int32_t stride_h, stride_w; /**< strides, >= 1 */
    int32_t pad_h, pad_w;       /**< zero padding on each side */
} esnn_conv_params;

/** Pooling window. */
typedef struct {
    int32_t kernel_h, kernel_w; /**< window size */
    int32_t stride_h, stride_w; /**< strides, >= 1 */
    int32_t pad_h, pad_w;       /**< padding on each side (zeros for sums; ignored by max) */
} esnn_pool_params;

/**
 * Where a convolution writes. With thresholds (one per output channel) it
 * fires: spike = [acc >= threshold], written as a one-plane bit map to
 * `spikes`. Without (NULL) it writes the accumulators to `accumulators`.
 */
typedef struct {
    const int32_t *thresholds; /**< per output channel, or NULL */
    int32_t *accumulators;     /**< int32 HWC output when thresholds is NULL */
    uint32_t *spikes;          /**< one-plane bit map output when thresholds is set */
} esnn_conv_output;

/** Bytes of the scratch buffer esnn_conv_s8_s16 needs: one int32 accumulator per output channel. */
int32_t esnn_conv_s8_s16_get_buffer_size(const esnn_dims *out_dims);

/**
 * @brief Convolution of an int16 image with int8 weights.
 * @param[in] params    kernel, stride, padding
 * @param[in] in_dims   input shape
 * @param[in] input     int16 HWC image
 * @param[in] weights   int8 [kh][kw][in][out] (output channel fastest)
 * @param[in] out_dims  output shape (c = output channels)
 * @param[in] buffer    scratch of esnn_conv_s8_s16_get_buffer_size() bytes, 4-byte aligned
 * @param[out] output   accumulators or spikes
 * @return ESNN_OK, or ESNN_ERROR_ARGUMENT if a pointer is NULL or the output shape does not follow from the input
 */
esnn_status esnn_conv_s8_s16(const esnn_conv_params *params, const esnn_dims *in_dims, const int16_t *input,
                             const int8_t *weights, const esnn_dims *out_dims, int32_t *buffer, const esnn_conv_output *output);

/** Bytes of the scratch buffer esnn_conv_s8_bits needs: one int32 accumulator per output channel. */
int32_t esnn_conv_s8_bits_get_buffer_size(const esnn_dims *out_dims);

/**
 * @brief Convolution of a bit map (any number of planes) with int8 weights, event-driven:
 *        acc_o = sum over set bits (tap, c, plane p) of 2^p w[tap][c][o]; silent inputs cost nothing.
 * @param[in] params    kernel, stride, padding
 * @param[in] in_dims   input shape
 * @param[in] planes    bit planes of the input, 1..16
 * @param[in] input     bit map
 * @param[in] weights   int8 [kh][kw][in][out] (output channel fastest: one contiguous row per input)
 * @param[in] out_dims  output shape
 * @param[in] buffer    scratch of esnn_conv_s8_bits_get_buffer_size() bytes, 4-byte aligned
 * @param[out] output   accumulators or spikes
 * @return ESNN_OK, or ESNN_ERROR_ARGUMENT
 */
esnn_status esnn_conv_s8_bits(const esnn_conv_params *params, const esnn_dims *in_dims, int32_t planes, const uint32_t *input,
                              const int8_t *weights, const esnn_dims *out_dims, int32_t *buffer, const esnn_conv_output *output);

/**
 * @brief Convolution of a bit map with binary (+1/-1) weights, by popcount:
 *        sum_c w_c x_c = sum_p 2^p (2 popcount(w & x_p) - popcount(x_p)).
 * @param[in] params    kernel, stride, padding
 * @param[in] in_dims   input shape
 * @param[in] planes    bit planes of the input, 1..16
 * @param[in] input     bit map
 * @param[in] weights   bit-packed signs [out][kh][kw][ESNN_WORDS(in)]
 * @param[in] out_dims  output shape
 * @param[out] output   accumulators or spikes
 * @return ESNN_OK, or ESNN_ERROR_ARGUMENT
 */
esnn_status esnn_conv_b1_bits(const esnn_conv_params *params, const esnn_dims *in_dims, int32_t planes, const uint32_t *input,
                              const uint32_t *weights, const esnn_dims *out_dims, const esnn_conv_output *output);

/** Bytes of the scratch buffer esnn_conv_mixed_bits needs: one int32 accumulator per output channel. */
int32_t esnn_conv_mixed_bits_get_buffer_size(const esnn_dims *out_dims);

/**
 * @brief Convolution of a bit map with a mixed layer: some output channels binary (+1/-1, by popcount as
 *        esnn_conv_b1_bits), the others int8 (event-driven as esnn_conv_s8_bits).
 * @param[in] params          kernel, stride, padding
 * @param[in] in_dims         input shape
 * @param[in] planes          bit planes of the input, 1..16
 * @param[in] input           bit map
 * @param[in] binary_weights  bit-packed signs of the binary channels [binary][kh][kw][ESNN_WORDS(in)] (NULL if none)
 * @param[in] int8_weights    int8 weights of the int8 channels [kh][kw][in][int8_channels] (NULL if none)
 * @param[in] int8_channels   how many output channels are int8 (the others, out_dims->c - int8_channels, binary)
 * @param[in] rows            per output channel: k >= 0 for int8 column k, -(k + 1) for binary row k
 * @param[in] out_dims        output shape
 * @param[in] buffer          scratch of esnn_conv_mixed_bits_get_buffer_size() bytes, 4-byte aligned
 * @param[out] output         accumulators or spikes
 * @return ESNN_OK, or ESNN_ERROR_ARGUMENT
 */
esnn_status esnn_conv_mixed_bits(const esnn_conv_params *params, const esnn_dims *in_dims, int32_t planes, const uint32_t *input,
                                 const uint32_t *binary_weights, const int8_t *int8_weights, int32_t int8_channels, const int16_t *rows,
                                 const esnn_dims *out_dims, int32_t *buffer, const esnn_conv_output *output);

/**
 * @brief Threshold-and-fire: spike = [acc >= threshold[c]].
 * @param[in] dims        shape of input and output
 * @param[in] input       int32 HWC accumulators
 * @param[in] thresholds  one per channel
 * @param[out] spikes     one-plane bit map
 * @return ESNN_OK, or ESNN_ERROR_ARGUMENT
 */
esnn_status esnn_fire_s32(const esnn_dims *dims, const int32_t *input, const int32_t *thresholds, uint32_t *spikes);

/** One term of a residual add: an int32 accumulator map or a bit map, and its integer multiplier per channel. */
typedef struct {
    const int32_t *accumulators; /**< int32 HWC, or NULL when the term is a bit map */
    const uint32_t *bits;        /**< bit map, used when accumulators is NULL */
    int32_t planes;              /**< planes of the bit map */
    const int32_t *multipliers;  /**< one per channel */
} esnn_add_term;

/**
 * @brief Residual add and fire in 64 bits: spike = [sum_t m_t[c] x_t >= threshold[c]].
 * @param[in] dims        shape of every term and of the output
 * @param[in] terms       the terms
 * @param[in] count       number of terms, >= 1
 * @param[in] thresholds  int64, one per channel
 * @param[out] spikes     one-plane bit map
 * @return ESNN_OK, or ESNN_ERROR_ARGUMENT
 */
esnn_status esnn_add_fire(const esnn_dims *dims, const esnn_add_term *terms, int32_t count, const int64_t *thresholds, uint32_t *spikes);

/**
 * @brief Sum pooling of a bit map (average pooling with the divisor moved into the next layer's scale).
 * @param[in] params      window; padded positions count as zero
 * @param[in] in_dims     input shape
 * @param[in] in_planes   planes of the input
 * @param[in] input       bit map
 * @param[in] out_dims    output shape
 * @param[in] out_planes  planes of the output: enough for the largest window sum
 * @param[out] output     bit map
 * @return ESNN_OK, or ESNN_ERROR_ARGUMENT
 */
esnn_status esnn_sumpool_bits(const esnn_pool_params *params, const esnn_dims *in_dims, int32_t in_planes, const uint32_t *input,
                              const esnn_dims *out_dims, int32_t out_planes, uint32_t *output);

/** @brief Sum pooling of int32 accumulators (no padding). Returns ESNN_OK or ESNN_ERROR_ARGUMENT. */
esnn_status esnn_sumpool_s32(const esnn_pool_params *params, const esnn_dims *in_dims, const int32_t *input,
                             const esnn_dims *out_dims, int32_t *output);

/** @brief Max pooling of a bit map; padded positions are ignored. Returns ESNN_OK or ESNN_ERROR_ARGUMENT. */
esnn_status esnn_maxpool_bits(const esnn_pool_params *params, const esnn_dims *in_dims, int32_t planes, const uint32_t *input,
                              const esnn_dims *out_dims, uint32_t *output);

/** @brief Max pooling of int32 accumulators; padded positions are ignored. Returns ESNN_OK or ESNN_ERROR_ARGUMENT. */
esnn_status esnn_maxpool_s32(const esnn_pool_params *params, const esnn_dims *in_dims, const int32_t *input,
                             const esnn_dims *out_dims, int32_t *output);

/**
 * @brief Copy a bit map into a larger zero map at an offset (zero padding of channels, rows and columns).
 * @param[in] in_dims   input shape
 * @param[in] planes    planes of input and output
 * @param[in] input     bit map
 * @param[in] front     channels added before
 * @param[in] top       rows added above
 * @param[in] left      columns added to the left
 * @param[in] out_dims  output shape, at least input + offsets
 * @param[out] output   bit map
 * @return ESNN_OK, or ESNN_ERROR_ARGUMENT
 */
esnn_status esnn_pad_bits(const esnn_dims *in_dims, int32_t planes, const uint32_t *input, int32_t front, int32_t top, int32_t left,
                          const esnn_dims *out_dims, uint32_t *output);

/**
 * @brief Strided slice of a bit map along one axis (0 = channels, 1 = rows, 2 = columns).
 * @return ESNN_OK, or ESNN_ERROR_ARGUMENT
 */
esnn_status esnn_slice_bits(const esnn_dims *in_dims, int32_t planes, const uint32_t *input, int32_t axis, int32_t start, int32_t step,
                            const esnn_dims *out_dims, uint32_t *output);

/**
 * @brief Place a bit map's channels at `offset` in a wider output map (one call per part of a concatenation).
 * @param[in] out_planes planes of the output; missing planes of the input are zero
 * @return ESNN_OK, or ESNN_ERROR_ARGUMENT
 */
esnn_status esnn_cat_bits(const esnn_dims *in_dims, int32_t in_planes, const uint32_t *input, int32_t offset,
                          const esnn_dims *out_dims, int32_t out_planes, uint32_t *output);

/**
 * @brief Logits: out[c] = x[c] * multiplier[c] + offset[c], x an int32 accumulator vector.
 * @return ESNN_OK, or ESNN_ERROR_ARGUMENT
 */
esnn_status esnn_output_s32(int32_t count, const int32_t *input, const int32_t *multipliers, const int64_t *offsets, int64_t *logits);

/** @brief Logits from a bit-map vector: out[c] = x[c] * multiplier[c] + offset[c]. Returns ESNN_OK or ESNN_ERROR_ARGUMENT. */
esnn_status esnn_output_bits(int32_t count, int32_t planes, const uint32_t *input, const int32_t *multipliers, const int64_t *offsets, int64_t *logits);

#ifdef __cplusplus
}
#endif

#endif /* ESNN_H */
