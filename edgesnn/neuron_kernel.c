/*
 * The one-timestep neuron of privatize.TrainableIF, fused for CPU training
 * (edgesnn/neuron_kernel.py compiles this file and calls it through ctypes).
 *
 * Per channel c and input current x:  v = x·scale[c] + shift[c],
 * spike s = [v >= theta[c]], output s·amplitude[c]. With the current norm,
 * scale and shift hold its batch statistics (neuron_kernel.py works them out
 * from esnn_neuron_moments). Backward, with the triangular surrogate
 * ds/dv = max(0, w − |v/θ − 1|)/(w²·θ) and g the output's gradient:
 *   g_v = g·amplitude·ds/dv,
 *   per-channel sums Σg_v, Σg_v·x, Σg_v·v, Σg·s (esnn_neuron_backward_sums),
 *   input gradient a[c]·g_v + b[c]·x + d[c] (esnn_neuron_backward_input).
 *
 * Tensors are R×C, channels last: rows are batch × space, as a channels-last
 * convolution output or a linear layer's output lies in memory. Currents are
 * float32 (dtype 0) or bfloat16 (dtype 1); outputs and gradients take the
 * current's dtype. Each call reads or writes every element once or twice,
 * where the unfused PyTorch graph takes some twenty passes over it.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { ESNN_FLOAT32 = 0, ESNN_BFLOAT16 = 1 };
enum { BLOCK_ROWS = 64, MAX_THREADS = 64 };

static inline float from_bf16(uint16_t h) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}

/* Round to nearest even, as PyTorch casts; NaN stays NaN. */
static inline uint16_t to_bf16(float f) {
    union { float f; uint32_t u; } v;
    v.f = f;
    if ((v.u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((v.u >> 16) | 0x40u);
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

typedef struct {
    int dtype;
    long rows, channels, begin, end;
    const void *x, *grad;
    void *out;
    const float *scale, *shift, *theta, *amplitude;
    float width;
    const float *a, *b, *d;
    double *sums; /* this thread's accumulators, `count` rows of C */
} job_t;

/* Float partial sums over a block of rows (the channel loop vectorises), added into doubles per block. */
static void flush(double *sums, float *partial, long count) {
    for (long i = 0; i < count; i++) {
        sums[i] += partial[i];
        partial[i] = 0.0f;
    }
}

static void *moments(void *arg) {
    job_t *job = arg;
    const long C = job->channels;
    float *partial = calloc((size_t)(2 * C), sizeof(float));
    if (partial == NULL)
        return arg;
    for (long r = job->begin; r < job->end; r++) {
        if (job->dtype == ESNN_BFLOAT16) {
            const uint16_t *x = (const uint16_t *)job->x + r * C;
            for (long c = 0; c < C; c++) {
                const float v = from_bf16(x[c]);
                partial[c] += v;
                partial[C + c] += v * v;
            }
        } else {
            const float *x = (const float *)job->x + r * C;
            for (long c = 0; c < C; c++) {
                partial[c] += x[c];
                partial[C + c] += x[c] * x[c];
            }
        }
        if ((r - job->begin) % BLOCK_ROWS == BLOCK_ROWS - 1)
            flush(job->sums, partial, 2 * C);
    }
    flush(job->sums, partial, 2 * C);
    free(partial);
    return NULL;
}

static void *forward(void *arg) {
    job_t *job = arg;
    const long C = job->channels;
    const float *restrict scale = job->scale, *restrict shift = job->shift, *restrict theta = job->theta, *restrict amplitudes = job->amplitude;
    if (job->dtype == ESNN_BFLOAT16) {
        uint16_t *amplitude = malloc((size_t)C * sizeof(uint16_t));
        if (amplitude == NULL)
            return arg;
        for (long c = 0; c < C; c++)
            amplitude[c] = to_bf16(job->amplitude[c]);
        for (long r = job->begin; r < job->end; r++) {
            const uint16_t *restrict x = (const uint16_t *)job->x + r * C;
            uint16_t *restrict out = (uint16_t *)job->out + r * C;
            for (long c = 0; c < C; c++) {
                const float v = from_bf16(x[c]) * scale[c] + shift[c];
                out[c] = v >= theta[c] ? amplitude[c] : 0;
            }
        }
        free(amplitude);
    } else {
        for (long r = job->begin; r < job->end; r++) {
            const float *restrict x = (const float *)job->x + r * C;
            float *restrict out = (float *)job->out + r * C;
            for (long c = 0; c < C; c++) {
                const float v = x[c] * scale[c] + shift[c];
                out[c] = v >= theta[c] ? amplitudes[c] : 0.0f;
            }
        }
    }
    return NULL;
}

/* The per-channel constants of g_v: amplitude/(w²·θ) and 1/θ. */
static int surrogate_constants(const job_t *job, float **gain, float **inverse) {
    const long C = job->channels;
    *gain = malloc((size_t)C * sizeof(float));
    *inverse = malloc((size_t)C * sizeof(float));
    if (*gain == NULL || *inverse == NULL) {
        free(*gain);
        free(*inverse);
        return -1;
    }
    for (long c = 0; c < C; c++) {
        (*inverse)[c] = 1.0f / job->theta[c];
        (*gain)[c] = job->amplitude[c] * (*inverse)[c] / (job->width * job->width);
    }
    return 0;
}

/* The loop body of both backward passes for one element: g_v from the current x and the output's gradient g. */
/* max(0, ·) as a select: fmaxf's NaN rules keep GCC from vectorising it without -ffast-math. */
static inline float positive(float t) { return t > 0.0f ? t : 0.0f; }
#define GRAD_MEMBRANE(x, g, c) ((g) * gains[c] * positive(width - fabsf(((x) * scale[c] + shift[c]) * inverses[c] - 1.0f)))

static void *backward_sums(void *arg) {
    job_t *job = arg;
    const long C = job->channels;
    const float width = job->width;
    const float *restrict scale = job->scale, *restrict shift = job->shift, *restrict theta = job->theta;
    float *gain, *inverse;
    float *partial = calloc((size_t)(4 * C), sizeof(float));
    if (partial == NULL || surrogate_constants(job, &gain, &inverse) != 0) {
        free(partial);
        return arg;
    }
    float *restrict sum_membrane = partial, *restrict sum_input = partial + C, *restrict sum_potential = partial + 2 * C, *restrict sum_spike = partial + 3 * C;
    const float *restrict gains = gain, *restrict inverses = inverse;
    for (long r = job->begin; r < job->end; r++) {
        if (job->dtype == ESNN_BFLOAT16) {
            const uint16_t *restrict xs = (const uint16_t *)job->x + r * C, *restrict gs = (const uint16_t *)job->grad + r * C;
            for (long c = 0; c < C; c++) {
                const float x = from_bf16(xs[c]), g = from_bf16(gs[c]), v = x * scale[c] + shift[c];
                const float grad_membrane = GRAD_MEMBRANE(x, g, c);
                sum_membrane[c] += grad_membrane;
                sum_input[c] += grad_membrane * x;
                sum_potential[c] += grad_membrane * v;
                sum_spike[c] += v >= theta[c] ? g : 0.0f;
            }
        } else {
            const float *restrict xs = (const float *)job->x + r * C, *restrict gs = (const float *)job->grad + r * C;
            for (long c = 0; c < C; c++) {
                const float x = xs[c], g = gs[c], v = x * scale[c] + shift[c];
                const float grad_membrane = GRAD_MEMBRANE(x, g, c);
                sum_membrane[c] += grad_membrane;
                sum_input[c] += grad_membrane * x;
                sum_potential[c] += grad_membrane * v;
                sum_spike[c] += v >= theta[c] ? g : 0.0f;
            }
        }
        if ((r - job->begin) % BLOCK_ROWS == BLOCK_ROWS - 1)
            flush(job->sums, partial, 4 * C);
    }
    flush(job->sums, partial, 4 * C);
    free(partial);
    free(gain);
    free(inverse);
    return NULL;
}

static void *backward_input(void *arg) {
    job_t *job = arg;
    const long C = job->channels;
    const float width = job->width;
    const float *restrict scale = job->scale, *restrict shift = job->shift, *restrict a = job->a, *restrict b = job->b, *restrict d = job->d;
    float *gain, *inverse;
    if (surrogate_constants(job, &gain, &inverse) != 0)
        return arg;
    const float *restrict gains = gain, *restrict inverses = inverse;
    for (long r = job->begin; r < job->end; r++) {
        if (job->dtype == ESNN_BFLOAT16) {
            const uint16_t *restrict xs = (const uint16_t *)job->x + r * C, *restrict gs = (const uint16_t *)job->grad + r * C;
            uint16_t *restrict out = (uint16_t *)job->out + r * C;
            for (long c = 0; c < C; c++) {
                const float x = from_bf16(xs[c]), g = from_bf16(gs[c]);
                out[c] = to_bf16(a[c] * GRAD_MEMBRANE(x, g, c) + b[c] * x + d[c]);
            }
        } else {
            const float *restrict xs = (const float *)job->x + r * C, *restrict gs = (const float *)job->grad + r * C;
            float *restrict out = (float *)job->out + r * C;
            for (long c = 0; c < C; c++) {
                const float x = xs[c], g = gs[c];
                out[c] = a[c] * GRAD_MEMBRANE(x, g, c) + b[c] * x + d[c];
            }
        }
    }
    free(gain);
    free(inverse);
    return NULL;
}

/* Per channel Σ(x − y)² and Σy² (y in `grad`): the current-matching loss of a student current x against its reference y. */
static void *difference_sums(void *arg) {
    job_t *job = arg;
    const long C = job->channels;
    float *partial = calloc((size_t)(2 * C), sizeof(float));
    if (partial == NULL)
        return arg;
    float *restrict sum_difference = partial, *restrict sum_reference = partial + C;
    for (long r = job->begin; r < job->end; r++) {
        if (job->dtype == ESNN_BFLOAT16) {
            const uint16_t *restrict xs = (const uint16_t *)job->x + r * C, *restrict ys = (const uint16_t *)job->grad + r * C;
            for (long c = 0; c < C; c++) {
                const float x = from_bf16(xs[c]), y = from_bf16(ys[c]);
                sum_difference[c] += (x - y) * (x - y);
                sum_reference[c] += y * y;
            }
        } else {
            const float *restrict xs = (const float *)job->x + r * C, *restrict ys = (const float *)job->grad + r * C;
            for (long c = 0; c < C; c++) {
                sum_difference[c] += (xs[c] - ys[c]) * (xs[c] - ys[c]);
                sum_reference[c] += ys[c] * ys[c];
            }
        }
        if ((r - job->begin) % BLOCK_ROWS == BLOCK_ROWS - 1)
            flush(job->sums, partial, 2 * C);
    }
    flush(job->sums, partial, 2 * C);
    free(partial);
    return NULL;
}

/* k·(x − y), k in `width`: the gradient of the current-matching loss. */
static void *difference_scaled(void *arg) {
    job_t *job = arg;
    const long C = job->channels;
    const float k = job->width;
    if (job->dtype == ESNN_BFLOAT16) {
        const uint16_t *restrict xs = (const uint16_t *)job->x + job->begin * C, *restrict ys = (const uint16_t *)job->grad + job->begin * C;
        uint16_t *restrict out = (uint16_t *)job->out + job->begin * C;
        for (long i = 0; i < (job->end - job->begin) * C; i++)
            out[i] = to_bf16(k * (from_bf16(xs[i]) - from_bf16(ys[i])));
    } else {
        const float *restrict xs = (const float *)job->x + job->begin * C, *restrict ys = (const float *)job->grad + job->begin * C;
        float *restrict out = (float *)job->out + job->begin * C;
        for (long i = 0; i < (job->end - job->begin) * C; i++)
            out[i] = k * (xs[i] - ys[i]);
    }
    return NULL;
}

/*
 * Runs `work` on `threads` row ranges of `job` (the calling thread takes the
 * first) and adds the threads' `count` accumulators per channel into `sums`.
 * Returns 0, or -1 when a thread could not be started or memory ran out.
 */
static int run(void *(*work)(void *), job_t job, int threads, double *sums, long count) {
    if (threads < 1)
        threads = 1;
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads > job.rows)
        threads = job.rows > 0 ? (int)job.rows : 1;
    job_t jobs[MAX_THREADS];
    pthread_t handles[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    double *accumulators = NULL;
    if (count > 0) {
        accumulators = calloc((size_t)(threads * count * job.channels), sizeof(double));
        if (accumulators == NULL)
            return -1;
    }
    int status = 0;
    for (int t = 0; t < threads; t++) {
        jobs[t] = job;
        jobs[t].begin = job.rows * t / threads;
        jobs[t].end = job.rows * (t + 1) / threads;
        jobs[t].sums = accumulators == NULL ? NULL : accumulators + (long)t * count * job.channels;
    }
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&handles[t], NULL, work, &jobs[t]) == 0)
            started[t] = 1;
        else if (work(&jobs[t]) != NULL) /* no thread to be had: this one does its share */
            status = -1;
    }
    if (work(&jobs[0]) != NULL)
        status = -1;
    for (int t = 1; t < threads; t++) {
        void *result = NULL;
        if (started[t] && (pthread_join(handles[t], &result) != 0 || result != NULL))
            status = -1;
    }
    if (accumulators != NULL) {
        memset(sums, 0, (size_t)(count * job.channels) * sizeof(double));
        for (int t = 0; t < threads; t++)
            for (long i = 0; i < count * job.channels; i++)
                sums[i] += accumulators[(long)t * count * job.channels + i];
        free(accumulators);
    }
    return status;
}

/* Σx and Σx² per channel: sums[0..C) and sums[C..2C). */
int esnn_neuron_moments(int dtype, const void *x, long rows, long channels, int threads, double *sums) {
    job_t job = {.dtype = dtype, .rows = rows, .channels = channels, .x = x};
    return run(moments, job, threads, sums, 2);
}

int esnn_neuron_forward(int dtype, const void *x, long rows, long channels, const float *scale, const float *shift, const float *theta, const float *amplitude, int threads, void *out) {
    job_t job = {.dtype = dtype, .rows = rows, .channels = channels, .x = x, .out = out, .scale = scale, .shift = shift, .theta = theta, .amplitude = amplitude};
    return run(forward, job, threads, NULL, 0);
}

/* Σg_v, Σg_v·x, Σg_v·v and Σg·s per channel, in four rows of C. */
int esnn_neuron_backward_sums(int dtype, const void *x, const void *grad, long rows, long channels, const float *scale, const float *shift, const float *theta, const float *amplitude, float width, int threads, double *sums) {
    job_t job = {.dtype = dtype, .rows = rows, .channels = channels, .x = x, .grad = grad, .scale = scale, .shift = shift, .theta = theta, .amplitude = amplitude, .width = width};
    return run(backward_sums, job, threads, sums, 4);
}

int esnn_neuron_backward_input(int dtype, const void *x, const void *grad, long rows, long channels, const float *scale, const float *shift, const float *theta, const float *amplitude, float width, const float *a, const float *b, const float *d, int threads, void *out) {
    job_t job = {.dtype = dtype, .rows = rows, .channels = channels, .x = x, .grad = grad, .out = out, .scale = scale, .shift = shift, .theta = theta, .amplitude = amplitude, .width = width, .a = a, .b = b, .d = d};
    return run(backward_input, job, threads, NULL, 0);
}

/* Σ(x − y)² and Σy² per channel, in two rows of C. */
int esnn_difference_sums(int dtype, const void *x, const void *y, long rows, long channels, int threads, double *sums) {
    job_t job = {.dtype = dtype, .rows = rows, .channels = channels, .x = x, .grad = y};
    return run(difference_sums, job, threads, sums, 2);
}

/* out = k·(x − y). */
int esnn_difference_scaled(int dtype, const void *x, const void *y, long rows, long channels, float k, int threads, void *out) {
    job_t job = {.dtype = dtype, .rows = rows, .channels = channels, .x = x, .grad = y, .out = out, .width = k};
    return run(difference_scaled, job, threads, NULL, 0);
}
