// CPU kernels for mlx-flash's fast CPU path (mlx_flash/accel/build.py builds this file on first
// use; mlx_flash/accel/kernels.py binds it).
//
// Weights stay in their 16-bit storage type (f16 or bf16, passed as uint16) and are widened to
// f32 in registers, so a decode step streams half the bytes of an f32 copy and the neuron cache
// holds rows exactly as they are on flash. Activations and accumulation are f32, except in the
// quantized kernels' default mode, where x is quantized to int8 per block of 32 and the dot
// products are integer (see "int8 activations" below; exact = 1 keeps f32).
//
// Entry points:
//   linear16  y[t, r] = W[r, :] . x[t, :] (+ b[r])                 (attention, lm_head)
//   linear_q  the same over MLX affine-quantized rows (4 or 8 bits): w = scale * q + bias
//   ffn16     y[t, :] = sum_j h[t, j] * down[j, :],  h = act(gate . x) * (up . x) * mask
//             over the first n neurons of the cache (part-major buffer, or raw bundles)
//   ffnq      ffn16 over 4/8-bit rows
//
// All split rows/neurons across OpenMP threads; without OpenMP they run on one thread.
// x86 with F16C/AVX2/FMA takes the vector path (and AVX-VNNI / AVX-512 VNNI where compiled
// for); anything else the portable scalar one.

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define FLASH_VECTOR 1
#else
#define FLASH_VECTOR 0
#endif

enum { DT_F16 = 0, DT_BF16 = 1 };
enum { ACT_SILU = 0, ACT_GELU = 1, ACT_GELU_APPROX = 2, ACT_RELU = 3, ACT_RELU2 = 4, ACT_IDENTITY = 5 };

int flash_vector_path(void) { return FLASH_VECTOR; }

int flash_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float to_f32(uint16_t v, int dt) {
    if (dt == DT_BF16) {
        uint32_t bits = (uint32_t)v << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    return f16_to_f32(v);
}

#if FLASH_VECTOR
static inline __m256 load8(const uint16_t *p, int dt) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (dt == DT_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

// out[t] = w . x[t, :] for t < T; x rows are d long and contiguous.
static inline void dot_tokens(const uint16_t *w, const float *x, int d, int T, int dt, float *out) {
    int c = 0;
#if FLASH_VECTOR
    if (T == 1) {  // decode: four independent chains hide the FMA latency
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (; c + 32 <= d; c += 32) {
            a0 = _mm256_fmadd_ps(load8(w + c, dt), _mm256_loadu_ps(x + c), a0);
            a1 = _mm256_fmadd_ps(load8(w + c + 8, dt), _mm256_loadu_ps(x + c + 8), a1);
            a2 = _mm256_fmadd_ps(load8(w + c + 16, dt), _mm256_loadu_ps(x + c + 16), a2);
            a3 = _mm256_fmadd_ps(load8(w + c + 24, dt), _mm256_loadu_ps(x + c + 24), a3);
        }
        for (; c + 8 <= d; c += 8) a0 = _mm256_fmadd_ps(load8(w + c, dt), _mm256_loadu_ps(x + c), a0);
        out[0] = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    } else {  // blocks of 4 tokens in named registers (an indexed array of them spills)
        for (int t0 = 0; t0 < T; t0 += 4) {
            int nt = T - t0 < 4 ? T - t0 : 4;
            const float *x0 = x + (size_t)t0 * d;  // missing tokens repeat the block's first
            const float *x1 = nt > 1 ? x0 + d : x0, *x2 = nt > 2 ? x0 + 2 * (size_t)d : x0;
            const float *x3 = nt > 3 ? x0 + 3 * (size_t)d : x0;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (c = 0; c + 8 <= d; c += 8) {
                __m256 wv = load8(w + c, dt);
                a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x0 + c), a0);
                a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x1 + c), a1);
                a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x2 + c), a2);
                a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x3 + c), a3);
            }
            float r[4] = {hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3)};
            for (int t = 0; t < nt; t++) out[t0 + t] = r[t];
        }
    }
#else
    for (int t = 0; t < T; t++) out[t] = 0.0f;
#endif
    for (; c < d; c++) {  // the tail (or everything, on the scalar path)
        float wv = to_f32(w[c], dt);
        for (int t = 0; t < T; t++) out[t] += wv * x[(size_t)t * d + c];
    }
}

// y[t, :] += h * w over d columns.
static inline void axpy16(float h, const uint16_t *w, float *y, int d, int dt) {
    int c = 0;
#if FLASH_VECTOR
    __m256 hv = _mm256_set1_ps(h);
    for (; c + 8 <= d; c += 8)
        _mm256_storeu_ps(y + c, _mm256_fmadd_ps(hv, load8(w + c, dt), _mm256_loadu_ps(y + c)));
#endif
    for (; c < d; c++) y[c] += h * to_f32(w[c], dt);
}

static inline float activate(float v, int act) {
    switch (act) {
    case ACT_SILU: return v / (1.0f + expf(-v));
    case ACT_GELU: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case ACT_GELU_APPROX:
        return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    case ACT_RELU: return v > 0.0f ? v : 0.0f;
    case ACT_IDENTITY: return v;  // a gate-resident bundle: act(gate x) comes as the mask
    default: return v > 0.0f ? v * v : 0.0f;  // ACT_RELU2
    }
}

// Software prefetch. The decode kernels stream each row once, and rows are short (a 4-bit
// row of 1536 is 768 bytes) or taken in a permuted order (ffnp's segments): the hardware
// prefetchers of the AVX-512 machines here (virtualised AMD EPYC, 4 KiB pages) held a 4-bit
// lm_head to 7.6-11 GB/s of the 25-28 GB/s one core streams. Rows FLASH_AHEAD rows ahead are
// asked for into L2 (prefetcht1): into L1 (prefetcht0), 4 rows ahead, the 1.5B's 4-bit lm_head
// (151936 x 1536) ran at 10.9 GB/s on session 15's EPYC (23 GB/s on session 11's); into L2,
// 8-32 rows ahead, 20-22 GB/s - a burst of L1 prefetches (two 960-byte rows are 30 lines)
// holds the L1's miss buffers that the demand loads need (BENCHMARKS.md, issue 20 session 15).
#ifndef FLASH_AHEAD
#define FLASH_AHEAD 16
#endif

// Ask for the n bytes at p into L2 (one hint per 64-byte line; a hint never faults). (With an
// `if (!p) return;` first, gcc 12 -O3 dropped most of the callers' prefetches.) Asked into L1
// with the input rows, the 8-bit down columns a batch ahead cost 290 ns a neuron of the 1.5B's
// shape, into L2 228 (session 11).
static inline void prefetch_bytes(const void *p, size_t n) {
    const char *c = (const char *)p;
    for (size_t k = 0; k < n; k += 64) __builtin_prefetch(c + k, 0, 2);
}

// Whether any token may need neuron j (mask NULL: all do); what prefetches ask for.
static inline int maybe_needed(const float *mask, int T, int n, int j) {
    if (!mask) return 1;
    for (int t = 0; t < T; t++)
        if (mask[(size_t)t * n + j] != 0.0f) return 1;
    return 0;
}

// Whether any token of the call needs neuron j (mask NULL: all do); if not, its h is zeroed.
static inline int needed(const float *mask, float *h, int T, int n, int j) {
    if (!mask) return 1;
    for (int t = 0; t < T; t++)
        if (mask[(size_t)t * n + j] != 0.0f) return 1;
    for (int t = 0; t < T; t++) h[(size_t)t * n + j] = 0.0f;
    return 0;
}

// h[t, j] = act(first + in_bias[j]) (gated: * (second + in_bias[bias_stride + j])) (* mask),
// the down projection's weight for neuron j and token t; returned too.
static inline float neuron_value(float first, float second, const float *in_bias,
                                 int64_t bias_stride, int j, int gated, const float *mask, int n,
                                 int t, int act, float *h) {
    float v = activate(first + (in_bias ? in_bias[j] : 0.0f), act);
    if (gated) v *= second + (in_bias ? in_bias[bias_stride + j] : 0.0f);
    if (mask) v *= mask[(size_t)t * n + j];
    h[(size_t)t * n + j] = v;
    return v;
}

// Inside a parallel region: this thread's number; *threads gets the team size (once).
static inline int team_member(int *threads) {
#ifdef _OPENMP
#pragma omp single
    *threads = omp_get_num_threads();
    return omp_get_thread_num();
#else
    *threads = 1;
    return 0;
#endif
}

// Inside a parallel region, after every thread's partial sums are complete: y = their sum.
static void sum_partials(const float *partial, int threads, size_t count, float *y) {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < (int64_t)count; i++) {
        float sum = 0.0f;
        for (int k = 0; k < threads; k++) sum += partial[(size_t)k * count + i];
        y[i] = sum;
    }
}

// y: (T, rows) f32; W: (rows, ld) 16-bit, the first d columns used; x: (T, d); b: (rows,) or NULL.
void linear16(const uint16_t *W, int64_t ld, int rows, int d, int dt, const float *x, int T,
              const float *b, float *y) {
#pragma omp parallel
    {
        float out[64];
        float *buf = T <= 64 ? out : (float *)malloc(sizeof(float) * (size_t)T);
#pragma omp for schedule(dynamic, 64)
        for (int r = 0; r < rows; r++) {
            dot_tokens(W + (size_t)r * ld, x, d, T, dt, buf);
            float bias = b ? b[r] : 0.0f;
            for (int t = 0; t < T; t++) y[(size_t)t * rows + r] = buf[t] + bias;
        }
        if (buf != out) free(buf);
    }
}

// The FFN over neurons [0, n). Part p of neuron j starts at W + p * part_stride +
// j * neuron_stride (16-bit elements): the neuron cache's part-major buffer has part_stride =
// capacity * d, neuron_stride = d; raw bundles (gate | up | down | ...) have part_stride = d,
// neuron_stride = the bundle stride. P = 3 gated (gate, up, down), 2 plain (up, down).
// in_bias: (P - 1, bias_stride) f32, or NULL. mask: (T, n) f32 0/1, or NULL. h: scratch (T, n).
// partial: scratch (threads, T, d). y: (T, d) output (overwritten).
void ffn16(const uint16_t *W, int64_t part_stride, int64_t neuron_stride, int P, int n, int d,
           int dt, const float *x, int T, const float *in_bias, int64_t bias_stride,
           const float *mask, int act, float *h, float *partial, float *y) {
    const int gated = P == 3;
    const uint16_t *down = W + (size_t)(P - 1) * part_stride;
    const size_t ns = (size_t)neuron_stride;
    int threads = 1;
#pragma omp parallel
    {
        int tid = team_member(&threads);
        float first[64], second[64];
        float *acc = partial + (size_t)tid * T * d;
        memset(acc, 0, sizeof(float) * (size_t)T * d);
#pragma omp for schedule(dynamic, 32)
        for (int j = 0; j < n; j++) {
            if (!needed(mask, h, T, n, j)) continue;  // skip the neuron's rows entirely
            size_t s = (size_t)j;
            for (int t0 = 0; t0 < T; t0 += 64) {
                int nt = T - t0 < 64 ? T - t0 : 64;
                const float *xt = x + (size_t)t0 * d;
                dot_tokens(W + s * ns, xt, d, nt, dt, first);
                if (gated) dot_tokens(W + part_stride + s * ns, xt, d, nt, dt, second);
                for (int t = 0; t < nt; t++) {
                    float v = neuron_value(first[t], second[t], in_bias, bias_stride, j, gated,
                                           mask, n, t0 + t, act, h);
                    if (v != 0.0f) axpy16(v, down + s * ns, acc + (size_t)(t0 + t) * d, d, dt);
                }
            }
        }
        sum_partials(partial, threads, (size_t)T * d, y);  // after the loop's barrier
    }
}

// MLX's affine quantization: row r has d * bits / 32 uint32 words, element i of a word at bits
// [i * bits, (i + 1) * bits); per group of `group` elements w = scales[g] * q + biases[g].
// So W[r] . x = sum_g scales[g] * (q_g . x_g) + biases[g] * sum(x_g): xsum (T, d / group) holds
// the group sums of x. Tokens go in blocks of 8 so each group is decoded once per block.
#if FLASH_VECTOR
static inline __m256 decode8(const uint32_t *words, int k, int bits) {
    if (bits == 8) {
        __m128i b = _mm_loadl_epi64((const __m128i *)((const uint8_t *)words + k));
        return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
    }
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32((int)words[k / 8]), shifts);
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xf)));
}
#endif

static inline float quant_at(const uint32_t *words, int i, int bits) {
    int per = 32 / bits;
    return (float)((words[i / per] >> ((i % per) * bits)) & ((1u << bits) - 1));
}

// out[t] = (scales * q + biases) . x[t] over one quantized row, for t < T (T <= 8).
static inline void dotq_tokens(const uint32_t *w, const float *s, const float *z, int d,
                               int bits, int group, const float *x, const float *xsum, int T,
                               float *out) {
    const int groups = d / group;
    for (int t = 0; t < T; t++) out[t] = 0.0f;
#if FLASH_VECTOR
    if (group % 8 == 0 && group <= 128) {
        __m256 acc[8], q[16];
        for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
        for (int g = 0; g < groups; g++) {
            for (int k = 0; k < group / 8; k++) q[k] = decode8(w, g * group + k * 8, bits);
            __m256 sv = _mm256_set1_ps(s[g]);
            for (int t = 0; t < T; t++) {
                const float *xt = x + (size_t)t * d + (size_t)g * group;
                __m256 a = _mm256_mul_ps(q[0], _mm256_loadu_ps(xt));
                for (int k = 1; k < group / 8; k++)
                    a = _mm256_fmadd_ps(q[k], _mm256_loadu_ps(xt + k * 8), a);
                acc[t] = _mm256_fmadd_ps(sv, a, acc[t]);
                out[t] += z[g] * xsum[(size_t)t * groups + g];
            }
        }
        for (int t = 0; t < T; t++) out[t] += hsum8(acc[t]);
        return;
    }
#endif
    for (int g = 0; g < groups; g++)
        for (int t = 0; t < T; t++) {
            const float *xt = x + (size_t)t * d + (size_t)g * group;
            float a = 0.0f;
            for (int k = 0; k < group; k++) a += quant_at(w, g * group + k, bits) * xt[k];
            out[t] += s[g] * a + z[g] * xsum[(size_t)t * groups + g];
        }
}

// y[:] += h * (scales * q + biases) over one quantized row of d values.
static inline void axpyq(float h, const uint32_t *w, const float *s, const float *z, int d,
                         int bits, int group, float *y) {
#if FLASH_VECTOR
    if (group % 8 == 0) {
        const int groups = d / group;
        for (int g = 0; g < groups; g++) {
            __m256 sv = _mm256_set1_ps(h * s[g]), zv = _mm256_set1_ps(h * z[g]);
            for (int k = 0; k < group; k += 8) {
                float *yk = y + g * group + k;
                __m256 v = _mm256_fmadd_ps(sv, decode8(w, g * group + k, bits), zv);
                _mm256_storeu_ps(yk, _mm256_add_ps(_mm256_loadu_ps(yk), v));
            }
        }
        return;
    }
#endif
    for (int i = 0; i < d; i++) y[i] += h * (s[i / group] * quant_at(w, i, bits) + z[i / group]);
}

// Scales / biases of one quantized row, 16-bit storage -> f32.
#define FLASH_MAX_GROUPS 512
static inline void widen(const uint16_t *a, int n, int dt, float *out) {
    int i = 0;
#if FLASH_VECTOR  // F16C: the scalar f16_to_f32 per scale was most of an lm_head row's time
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, load8(a + i, dt));
    if (i < n) {  // the tail through a padded copy (reading past `a` may leave its buffer)
        uint16_t tail[8] = {0};
        float wide[8];
        memcpy(tail, a + i, sizeof(uint16_t) * (size_t)(n - i));
        _mm256_storeu_ps(wide, load8(tail, dt));
        memcpy(out + i, wide, sizeof(float) * (size_t)(n - i));
        return;
    }
#endif
    for (; i < n; i++) out[i] = to_f32(a[i], dt);
}

// ffn16 over the quantized cache: q (P, capacity, d * bits / 32) uint32, scales / biases
// (P, capacity, d / group) 16-bit (dt), neurons [0, n); in_bias (P - 1, capacity) f32 or NULL;
// mask, h, partial and y as in ffn16; xsum (T, d / group) the group sums of x.
static void ffnq_exact(const uint32_t *q, const uint16_t *scales, const uint16_t *biases, int dt,
                       int P,
          int64_t capacity, int n, int d, int bits, int group, const float *x, int T,
          const float *xsum, const float *in_bias, const float *mask, int act, float *h,
          float *partial, float *y) {
    const int gated = P == 3, words = d * bits / 32, groups = d / group;
    const size_t qpart = (size_t)capacity * words, spart = (size_t)capacity * groups;
    int threads = 1;
#pragma omp parallel
    {
        int tid = team_member(&threads);
        float first[8], second[8], s[FLASH_MAX_GROUPS], z[FLASH_MAX_GROUPS];
        float *acc = partial + (size_t)tid * T * d;
        memset(acc, 0, sizeof(float) * (size_t)T * d);
#pragma omp for schedule(dynamic, 32)
        for (int j = 0; j < n; j++) {
            if (!needed(mask, h, T, n, j)) continue;  // skip the neuron's rows entirely
            for (int t0 = 0; t0 < T; t0 += 8) {
                int nt = T - t0 < 8 ? T - t0 : 8;
                const float *xt = x + (size_t)t0 * d, *st = xsum + (size_t)t0 * groups;
                size_t row = (size_t)j * groups;
                widen(scales + row, groups, dt, s);
                widen(biases + row, groups, dt, z);
                dotq_tokens(q + j * (size_t)words, s, z, d, bits, group, xt, st, nt, first);
                if (gated) {
                    widen(scales + spart + row, groups, dt, s);
                    widen(biases + spart + row, groups, dt, z);
                    dotq_tokens(q + qpart + j * (size_t)words, s, z, d, bits, group, xt, st, nt,
                                second);
                }
                widen(scales + (P - 1) * spart + row, groups, dt, s);
                widen(biases + (P - 1) * spart + row, groups, dt, z);
                for (int t = 0; t < nt; t++) {
                    float v = activate(first[t] + (in_bias ? in_bias[j] : 0.0f), act);
                    if (gated) v *= second[t] + (in_bias ? in_bias[capacity + j] : 0.0f);
                    if (mask) v *= mask[(size_t)(t0 + t) * n + j];
                    h[(size_t)(t0 + t) * n + j] = v;
                    if (v != 0.0f)
                        axpyq(v, q + (P - 1) * qpart + j * (size_t)words, s, z, d, bits, group,
                              acc + (size_t)(t0 + t) * d);
                }
            }
        }
        sum_partials(partial, threads, (size_t)T * d, y);  // after the loop's barrier
    }
}


// ---------------------------------------------------------------------------------------------
// int8 activations for the quantized kernels (what llama.cpp does for its Q4/Q8 dot products):
// x is quantized once per call in blocks of 32, x ~ dx[b] * xq, |xq| <= 127, so a row's dot is
// sum over 32-blocks of scale[g] * dx[b] * (q . xq)_b in integers (VNNI dpbusd, AVX2 maddubs,
// or scalar), plus biases[g] * sum(x_g) over the quantized x (the exact sum would leave the
// offset of q, mean 7.5 at 4 bits, times sum(x - dx * xq) uncancelled: 1.5% error, not 0.5%).
// The down projection (y += h * row) takes integer products too on the vector builds: a batch
// of 16 neurons' coefficients (h, or h * scale per group) quantized to int8 for 4-bit rows /
// columns (down_rows_q4i, down_batch_q4i), int16 h for ffnp's 8-bit columns (down_batch_q8i);
// the scalar build keeps it f32. exact = 1 in linear_q / ffnq / ffnp keeps f32 activations and
// an f32 down projection throughout (the kernels above).
//
// 4-bit layout: MLX packs element 2k in the low nibble of byte k and 2k + 1 in the high one. A
// chunk of 64 elements (32 bytes; the last chunk of a row may be 32 elements, 16 bytes) is
// handled as its low nibbles (the even elements) then its high ones (the odd elements), so xq
// and the down projection's accumulator are stored in that order ("packed order", `packed_pos`)
// and the nibbles need no shuffles. 8-bit rows are in natural order.
// ---------------------------------------------------------------------------------------------

enum { DT_F32 = 2 };  // scales / biases given as f32 (linear_q)
#define QBLOCK 32

// Where element i of a d-long row goes in packed order (4-bit), or i (8-bit).
static inline int packed_pos(int i, int d, int bits) {
    if (bits != 4) return i;
    int start = i - i % 64, half = start + 64 <= d ? 32 : 16, k = i - start;
    return start + (k & 1) * half + (k >> 1);
}

// x (T, d) -> xq (T, d) int8 in packed order, dx (T, d / 32) block scales, dxl (T, d / 8) the
// scale of each 8 elements (a 64-chunk's int32 lane i covers elements 8i..8i+7), xsl (T, d / 8)
// the sums of dx * xq over each 8 elements (what the biases multiply), isum (T, d / 32) block
// sums of xq.
static void quantize_x(const float *x, int T, int d, int bits, int8_t *xq, float *dx, float *dxl,
                       float *xsl, int32_t *isum) {
    const int blocks = d / QBLOCK;
    for (int t = 0; t < T; t++) {
        const float *xt = x + (size_t)t * d;
        for (int b = 0; b < blocks; b++) {
            float m = 0.0f;
            for (int k = 0; k < QBLOCK; k++) {  // not fmaxf: a libm call, not inlined
                const float a = fabsf(xt[b * QBLOCK + k]);
                m = a > m ? a : m;
            }
            float scale = m / 127.0f, inv = m > 0.0f ? 127.0f / m : 0.0f;
            int32_t sum = 0, part[QBLOCK / 8] = {0};
            for (int k = 0; k < QBLOCK; k++) {
                int i = b * QBLOCK + k;
                int v = (int)lrintf(xt[i] * inv);
                v = v > 127 ? 127 : (v < -127 ? -127 : v);
                xq[(size_t)t * d + packed_pos(i, d, bits)] = (int8_t)v;
                sum += v;
                part[k / 8] += v;
            }
            dx[(size_t)t * blocks + b] = scale;
            isum[(size_t)t * blocks + b] = sum;
            for (int k = 0; k < QBLOCK / 8; k++) {
                dxl[(size_t)t * (d / 8) + b * 4 + k] = scale;
                xsl[(size_t)t * (d / 8) + b * 4 + k] = scale * (float)part[k];
            }
        }
    }
}

typedef struct {  // one token's quantized activations
    const int8_t *q;
    const float *dx, *dxl, *xsl;
    const int32_t *isum;
    const float *xsg;  // per weight group: the sum of dx * xq (zero-padded to a multiple of 8)
} QX;


#if FLASH_VECTOR
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define FLASH_512 1  // 16-wide axpy; 128 elements a step in dot_row_i8 for groups dot_q4_row cannot take
#else
#define FLASH_512 0
#endif
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
#define FLASH_VNNI 1
static inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_dpbusd_epi32(acc, u, s);
#endif
}
#else
#define FLASH_VNNI 0
#endif

// int32 lane i = sum over bytes 4i..4i+3 of lo * xlo + hi * xhi (lo, hi in 0..15).
static inline __m256i dot_nibbles(__m256i lo, __m256i xlo, __m256i hi, __m256i xhi) {
#if FLASH_VNNI
    return dot_u8s8(dot_u8s8(_mm256_setzero_si256(), lo, xlo), hi, xhi);
#else  // pairs <= 2 * 15 * 127 each, their sum fits int16
    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
#endif
}

// int32 lane i = sum over bytes 4i..4i+3 of (w - 128) * x (w: 8-bit weights 0..255); the +128 *
// sum(x) the caller adds. VNNI: w . x directly, flagged by the return of 0 in *shifted.
static inline __m256i dot_bytes(__m256i w, __m256i x, int *shifted) {
#if FLASH_VNNI
    *shifted = 0;
    return dot_u8s8(_mm256_setzero_si256(), w, x);
#else  // maddubs(u8, s8) saturates for 255 * 127 pairs: |w - 128| <= 128 times sign-moved x
    *shifted = 1;
    __m256i ws = _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80));
    __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(ws), _mm256_sign_epi8(x, ws));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
#endif
}
#endif

// Scale or bias i of a row stored as sdt (DT_F16, DT_BF16 or DT_F32).
static inline float scale_at(const void *a, int i, int sdt) {
    if (sdt == DT_F32) return ((const float *)a)[i];
    uint16_t v = ((const uint16_t *)a)[i];
#if FLASH_VECTOR
    if (sdt == DT_F16) return _cvtsh_ss(v);
#endif
    return to_f32(v, sdt);
}

#if FLASH_VECTOR
// 32 packed bytes -> their low nibbles (even elements) and high nibbles (odd elements).
static inline void nibbles256(const uint8_t *p, __m256i *lo, __m256i *hi) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    *lo = _mm256_and_si256(v, m4);
    *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
}

#if FLASH_512
static inline __m512i load_halves(const int8_t *a, const int8_t *b) {  // 32 bytes each
    __m256i lo = _mm256_loadu_si256((const __m256i *)a);
    __m256i hi = _mm256_loadu_si256((const __m256i *)b);
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}
#endif

// A 4-bit row's 64-chunk at column c against xq (packed order): int32 lane i = elements
// c + 8i .. c + 8i + 7.
static inline __m256i chunk_q4(const uint8_t *w, int c, const int8_t *xq) {
    __m256i lo, hi;
    nibbles256(w + c / 2, &lo, &hi);
    return dot_nibbles(lo, _mm256_loadu_si256((const __m256i *)(xq + c)), hi,
                       _mm256_loadu_si256((const __m256i *)(xq + c + 32)));
}

// The weight scale of each lane of the 64-chunk at c (two groups when groups are 32 long).
static inline __m256 chunk_scales(const void *sv, int c, int gs, int sdt) {
    if (gs >= 6) return _mm256_set1_ps(scale_at(sv, c >> gs, sdt));
    return _mm256_set_m128(_mm_set1_ps(scale_at(sv, (c >> gs) + 1, sdt)),
                           _mm_set1_ps(scale_at(sv, c >> gs, sdt)));
}

// b + the 64-chunk at c's biases times the sums of x of their 8 elements.
static inline __m256 chunk_bias(const void *zv, int c, int gs, int sdt, const float *xsl,
                                __m256 b) {
    return _mm256_fmadd_ps(chunk_scales(zv, c, gs, sdt), _mm256_loadu_ps(xsl + c / 8), b);
}

static inline __m256 chunk_fma(__m256i i, __m256 ws, const float *dxl, int c, __m256 acc) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(ws, _mm256_loadu_ps(dxl + c / 8)),
                           acc);
}
#endif

// sum over bytes k in [k0, k1) of low nibble * xlo[k] + high nibble * xhi[k].
static inline int32_t nibble_dot(const uint8_t *wb, const int8_t *xlo, const int8_t *xhi, int k0,
                                 int k1) {
    int32_t sum = 0;
    for (int k = k0; k < k1; k++) sum += (wb[k] & 15) * xlo[k] + (wb[k] >> 4) * xhi[k];
    return sum;
}

// The scalar rest of a row's dot from column c on (all of it without vectors), with the
// biases' term of those columns.
static inline float dot_row_rest(const uint8_t *w, const void *sv, const void *zv, int sdt,
                                 int d, int bits, int group, QX x, int c) {
    const int c0 = c, gs = __builtin_ctz((unsigned)group);  // a power of two: no idiv per chunk
    float out = 0.0f;
    if (bits == 4) {
        for (; c + 64 <= d; c += 64) {  // the chunk's two 32-blocks
            const uint8_t *wb = w + c / 2;
            int32_t s0 = nibble_dot(wb, x.q + c, x.q + c + 32, 0, 16);
            int32_t s1 = nibble_dot(wb, x.q + c, x.q + c + 32, 16, 32);
            out += scale_at(sv, c >> gs, sdt) * x.dx[c / QBLOCK] * (float)s0
                   + scale_at(sv, (c + 32) >> gs, sdt) * x.dx[c / QBLOCK + 1] * (float)s1;
        }
        for (; c < d; c += 32) {  // a last chunk of 32
            const uint8_t *wb = w + c / 2;
            int32_t s0 = nibble_dot(wb, x.q + c, x.q + c + 16, 0, 16);
            out += scale_at(sv, c >> gs, sdt) * x.dx[c / QBLOCK] * (float)s0;
        }
    } else {
        for (; c < d; c += 32) {
            int32_t s0 = 0;
            for (int k = 0; k < 32; k++) s0 += w[c + k] * x.q[c + k];
            out += scale_at(sv, c >> gs, sdt) * x.dx[c / QBLOCK] * (float)s0;
        }
    }
    for (int k = c0 / 8; k < d / 8; k++) out += scale_at(zv, (8 * k) >> gs, sdt) * x.xsl[k];
    return out;
}

#if FLASH_VECTOR
// 8 scales / biases from i on, stored as sdt; n < 8 of them through a zero-padded copy (reading
// past the row may leave its buffer).
static inline __m256 load8s(const void *a, int i, int sdt) {
    if (sdt == DT_F32) return _mm256_loadu_ps((const float *)a + i);
    return load8((const uint16_t *)a + i, sdt);
}

static inline __m256 load8s_tail(const void *a, int i, int n, int sdt) {
    if (sdt == DT_F32) {
        float buf[8] = {0};
        memcpy(buf, (const float *)a + i, sizeof(float) * (size_t)n);
        return _mm256_loadu_ps(buf);
    }
    uint16_t buf[8] = {0};  // one widening for the n (the scalar one per element was 5% of a
    memcpy(buf, (const uint16_t *)a + i, sizeof(uint16_t) * (size_t)n);  // 0.5B FFN: 28 groups)
    return load8(buf, sdt);
}
#endif

#if FLASH_VECTOR

// The 64-chunk at byte offset wb of a 4-bit row against xq (packed order): int32 lanes 0-3 the
// chunk's first 32-block, 4-7 its second.
static inline __m256i chunk_q4p(const uint8_t *wb, const int8_t *xq) {
    __m256i lo, hi;
    nibbles256(wb, &lo, &hi);
    return dot_nibbles(lo, _mm256_loadu_si256((const __m256i *)xq), hi,
                       _mm256_loadu_si256((const __m256i *)(xq + 32)));
}

// dot_row_i8 of a 4-bit row, groups of 2^gs (32 <= group <= 256) elements: the row's scales
// are widened 8 at a time (F16C) and its biases' term is one vector dot with the token's
// per-group sums (xsg); each block of 32 is then scaled by scale[g] * dx[b], 8 blocks' worth
// formed with one multiply and handed to each chunk by a lane permute. (The generic loop read
// and converted two scales and two biases per chunk with scalar loads and branches: 3x slower;
// AVX-512 builds had been left on that loop, in 512-bit form: the 1.5B's decode FFN 148 -> 99
// ms on one EPYC core with this one, issue 20 session 11.)
static inline float dot_q4_row(const uint8_t *w, const void *sv, const void *zv, int sdt, int d,
                               int gs, QX x) {
    const int groups = d >> gs, sh = gs - 5, blocks = d / QBLOCK, full = (d / 64) * 2;
    float sbuf[FLASH_MAX_GROUPS + 8];
    __m256 bacc = _mm256_setzero_ps();
    int g = 0;
    for (; g + 8 <= groups; g += 8) {
        _mm256_storeu_ps(sbuf + g, load8s(sv, g, sdt));
        bacc = _mm256_fmadd_ps(load8s(zv, g, sdt), _mm256_loadu_ps(x.xsg + g), bacc);
    }
    if (g < groups) {
        _mm256_storeu_ps(sbuf + g, load8s_tail(sv, g, groups - g, sdt));
        bacc = _mm256_fmadd_ps(load8s_tail(zv, g, groups - g, sdt), _mm256_loadu_ps(x.xsg + g),
                               bacc);
    }
    const __m256i sidx = _mm256_setr_epi32(0, 1 >> sh, 2 >> sh, 3 >> sh, 4 >> sh, 5 >> sh,
                                           6 >> sh, 7 >> sh);
    const __m256i p0 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    const __m256i p1 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
    const __m256i p2 = _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5);
    const __m256i p3 = _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int b = 0;
    for (; b + 8 <= full; b += 8) {  // 256 elements: 4 chunks, 8 blocks
        __m256 s = _mm256_loadu_ps(sbuf + (b >> sh));
        if (sh) s = _mm256_permutevar8x32_ps(s, sidx);
        const __m256 v = _mm256_mul_ps(s, _mm256_loadu_ps(x.dx + b));
        const uint8_t *wb = w + (size_t)b * 16;
        const int8_t *xq = x.q + (size_t)b * 32;
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk_q4p(wb, xq)),
                             _mm256_permutevar8x32_ps(v, p0), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk_q4p(wb + 32, xq + 64)),
                             _mm256_permutevar8x32_ps(v, p1), a1);
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk_q4p(wb + 64, xq + 128)),
                             _mm256_permutevar8x32_ps(v, p2), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk_q4p(wb + 96, xq + 192)),
                             _mm256_permutevar8x32_ps(v, p3), a1);
    }
    for (; b < full; b += 2) {  // whole chunks left over
        __m256 v = _mm256_set_m128(_mm_set1_ps(sbuf[(b + 1) >> sh] * x.dx[b + 1]),
                                   _mm_set1_ps(sbuf[b >> sh] * x.dx[b]));
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk_q4p(w + (size_t)b * 16, x.q + (size_t)b * 32)),
                             v, a0);
    }
    float out = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), bacc));
    if (b < blocks) {  // a last chunk of 32 (d % 64 == 32): 16 bytes, its xq lo | hi halves
        const int c = b * QBLOCK;
        out += sbuf[b >> sh] * x.dx[b] * (float)nibble_dot(w + c / 2, x.q + c, x.q + c + 16, 0, 16);
    }
    return out;
}

// dot_q4_row of two rows against one token (an FFN's gate and up): each chunk of x is loaded
// once for both.
static inline void dot_q4_rows2(const uint8_t *wa, const void *sa, const void *za,
                                const uint8_t *wb, const void *sb, const void *zb, int sdt,
                                int d, int gs, QX x, float *outa, float *outb) {
    const int groups = d >> gs, sh = gs - 5, blocks = d / QBLOCK, full = (d / 64) * 2;
    float bufa[FLASH_MAX_GROUPS + 8], bufb[FLASH_MAX_GROUPS + 8];
    __m256 ba = _mm256_setzero_ps(), bb = ba;
    int g = 0;
    for (; g + 8 <= groups; g += 8) {
        const __m256 xs = _mm256_loadu_ps(x.xsg + g);
        _mm256_storeu_ps(bufa + g, load8s(sa, g, sdt));
        _mm256_storeu_ps(bufb + g, load8s(sb, g, sdt));
        ba = _mm256_fmadd_ps(load8s(za, g, sdt), xs, ba);
        bb = _mm256_fmadd_ps(load8s(zb, g, sdt), xs, bb);
    }
    if (g < groups) {
        const __m256 xs = _mm256_loadu_ps(x.xsg + g);
        _mm256_storeu_ps(bufa + g, load8s_tail(sa, g, groups - g, sdt));
        _mm256_storeu_ps(bufb + g, load8s_tail(sb, g, groups - g, sdt));
        ba = _mm256_fmadd_ps(load8s_tail(za, g, groups - g, sdt), xs, ba);
        bb = _mm256_fmadd_ps(load8s_tail(zb, g, groups - g, sdt), xs, bb);
    }
    const __m256i sidx = _mm256_setr_epi32(0, 1 >> sh, 2 >> sh, 3 >> sh, 4 >> sh, 5 >> sh,
                                           6 >> sh, 7 >> sh);
    const __m256i pidx[4] = {_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1),
                             _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3),
                             _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5),
                             _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7)};
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    int b = 0;
    for (; b + 8 <= full; b += 8) {
        __m256 s_a = _mm256_loadu_ps(bufa + (b >> sh)), s_b = _mm256_loadu_ps(bufb + (b >> sh));
        if (sh) {
            s_a = _mm256_permutevar8x32_ps(s_a, sidx);
            s_b = _mm256_permutevar8x32_ps(s_b, sidx);
        }
        const __m256 dxv = _mm256_loadu_ps(x.dx + b);
        const __m256 va = _mm256_mul_ps(s_a, dxv), vb = _mm256_mul_ps(s_b, dxv);
        for (int k = 0; k < 4; k++) {
            const size_t off = (size_t)b * 16 + 32 * k;
            const int8_t *xq = x.q + (size_t)b * 32 + 64 * k;
            const __m256i xlo = _mm256_loadu_si256((const __m256i *)xq);
            const __m256i xhi = _mm256_loadu_si256((const __m256i *)(xq + 32));
            const __m256i qa = _mm256_loadu_si256((const __m256i *)(wa + off));
            const __m256i qb = _mm256_loadu_si256((const __m256i *)(wb + off));
            const __m256i ia = dot_nibbles(_mm256_and_si256(qa, m4), xlo,
                                           _mm256_and_si256(_mm256_srli_epi16(qa, 4), m4), xhi);
            const __m256i ib = dot_nibbles(_mm256_and_si256(qb, m4), xlo,
                                           _mm256_and_si256(_mm256_srli_epi16(qb, 4), m4), xhi);
            if (k & 1) {
                a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia), _mm256_permutevar8x32_ps(va, pidx[k]), a1);
                b1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ib), _mm256_permutevar8x32_ps(vb, pidx[k]), b1);
            } else {
                a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia), _mm256_permutevar8x32_ps(va, pidx[k]), a0);
                b0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ib), _mm256_permutevar8x32_ps(vb, pidx[k]), b0);
            }
        }
    }
    for (; b < full; b += 2) {
        const __m256 dxv = _mm256_set_m128(_mm_set1_ps(x.dx[b + 1]), _mm_set1_ps(x.dx[b]));
        const __m256 va = _mm256_mul_ps(_mm256_set_m128(_mm_set1_ps(bufa[(b + 1) >> sh]),
                                                        _mm_set1_ps(bufa[b >> sh])), dxv);
        const __m256 vb = _mm256_mul_ps(_mm256_set_m128(_mm_set1_ps(bufb[(b + 1) >> sh]),
                                                        _mm_set1_ps(bufb[b >> sh])), dxv);
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk_q4p(wa + (size_t)b * 16, x.q + (size_t)b * 32)),
                             va, a0);
        b0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk_q4p(wb + (size_t)b * 16, x.q + (size_t)b * 32)),
                             vb, b0);
    }
    float ra = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), ba));
    float rb = hsum8(_mm256_add_ps(_mm256_add_ps(b0, b1), bb));
    if (b < blocks) {  // a last chunk of 32
        const int c = b * QBLOCK;
        ra += bufa[b >> sh] * x.dx[b] * (float)nibble_dot(wa + c / 2, x.q + c, x.q + c + 16, 0, 16);
        rb += bufb[b >> sh] * x.dx[b] * (float)nibble_dot(wb + c / 2, x.q + c, x.q + c + 16, 0, 16);
    }
    *outa = ra;
    *outb = rb;
}
#endif

#if FLASH_VECTOR
// Rows a and b's per-group bias terms against 4 tokens: out[t] += sum_g z[g] * x[t].xsg[g].
static inline void bias_terms4(const void *za, const void *zb, int sdt, int groups,
                               const QX *x, float *outa, float *outb) {
    __m256 ba[4], bb[4];
    for (int t = 0; t < 4; t++) ba[t] = bb[t] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g += 8) {
        const int n = groups - g < 8 ? groups - g : 8;
        const __m256 zva = n == 8 ? load8s(za, g, sdt) : load8s_tail(za, g, n, sdt);
        const __m256 zvb = n == 8 ? load8s(zb, g, sdt) : load8s_tail(zb, g, n, sdt);
        for (int t = 0; t < 4; t++) {
            const __m256 xs = _mm256_loadu_ps(x[t].xsg + g);  // zero-padded to 8
            ba[t] = _mm256_fmadd_ps(zva, xs, ba[t]);
            bb[t] = _mm256_fmadd_ps(zvb, xs, bb[t]);
        }
    }
    for (int t = 0; t < 4; t++) {
        outa[t] += hsum8(ba[t]);
        outb[t] += hsum8(bb[t]);
    }
}

// dot_q4_rows2 against 4 tokens (a prompt's FFN): the two rows' nibbles are decoded once per
// 64-chunk for the 4 tokens, each token's x once for both rows, and the rows' scales widened
// once (dot_tokens_i8 took a row at a time, read two scales and two biases per chunk with
// scalar loads and added the biases' term per chunk and token).
static inline void dot_q4_rows2_t4(const uint8_t *wa, const void *sa, const void *za,
                                   const uint8_t *wb, const void *sb, const void *zb, int sdt,
                                   int d, int gs, const QX *x, float *outa, float *outb) {
    const int groups = d >> gs, sh = gs - 5, blocks = d / QBLOCK, full = (d / 64) * 2;
    float bufa[FLASH_MAX_GROUPS + 8], bufb[FLASH_MAX_GROUPS + 8];
    for (int g = 0; g < groups; g += 8) {
        const int n = groups - g < 8 ? groups - g : 8;
        _mm256_storeu_ps(bufa + g, n == 8 ? load8s(sa, g, sdt) : load8s_tail(sa, g, n, sdt));
        _mm256_storeu_ps(bufb + g, n == 8 ? load8s(sb, g, sdt) : load8s_tail(sb, g, n, sdt));
    }
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256 A[4], B[4];
    for (int t = 0; t < 4; t++) A[t] = B[t] = _mm256_setzero_ps();
    for (int b = 0; b < full; b += 2) {  // one 64-chunk: blocks b and b + 1
        const size_t off = (size_t)b * 16;
        const __m256 s_a = _mm256_set_m128(_mm_set1_ps(bufa[(b + 1) >> sh]),
                                           _mm_set1_ps(bufa[b >> sh]));
        const __m256 s_b = _mm256_set_m128(_mm_set1_ps(bufb[(b + 1) >> sh]),
                                           _mm_set1_ps(bufb[b >> sh]));
        const __m256i qa = _mm256_loadu_si256((const __m256i *)(wa + off));
        const __m256i qb = _mm256_loadu_si256((const __m256i *)(wb + off));
        const __m256i la = _mm256_and_si256(qa, m4);
        const __m256i ha = _mm256_and_si256(_mm256_srli_epi16(qa, 4), m4);
        const __m256i lb = _mm256_and_si256(qb, m4);
        const __m256i hb = _mm256_and_si256(_mm256_srli_epi16(qb, 4), m4);
        for (int t = 0; t < 4; t++) {
            const int8_t *xq = x[t].q + (size_t)b * 32;
            const __m256i xlo = _mm256_loadu_si256((const __m256i *)xq);
            const __m256i xhi = _mm256_loadu_si256((const __m256i *)(xq + 32));
            const __m256 dl = _mm256_loadu_ps(x[t].dxl + (size_t)b * 4);  // lanes' dx
            A[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_nibbles(la, xlo, ha, xhi)),
                                   _mm256_mul_ps(s_a, dl), A[t]);
            B[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_nibbles(lb, xlo, hb, xhi)),
                                   _mm256_mul_ps(s_b, dl), B[t]);
        }
    }
    for (int t = 0; t < 4; t++) {
        outa[t] = hsum8(A[t]);
        outb[t] = hsum8(B[t]);
        if (full < blocks) {  // a last chunk of 32 (d % 64 == 32)
            const int c = full * QBLOCK;
            outa[t] += bufa[full >> sh] * x[t].dx[full]
                       * (float)nibble_dot(wa + c / 2, x[t].q + c, x[t].q + c + 16, 0, 16);
            outb[t] += bufb[full >> sh] * x[t].dx[full]
                       * (float)nibble_dot(wb + c / 2, x[t].q + c, x[t].q + c + 16, 0, 16);
        }
    }
    bias_terms4(za, zb, sdt, groups, x, outa, outb);
}
#endif

#if FLASH_VECTOR
// Whether an 8-bit row of d elements in groups of 2^gs takes dot_q8_row / dot_q8_rows2.
static inline int q8_row_fits(int d, int gs) {
    return gs >= 5 && gs <= 8 && d % QBLOCK == 0 && d / QBLOCK <= FLASH_MAX_GROUPS;
}

// dot_q8_row's per-row part: cbuf[b] = scale of block b's group * dx[b] for the row's blocks;
// returns the biases' term.
static inline float q8_prepare(const void *sv, const void *zv, int sdt, int d, int gs, QX x,
                               float *cbuf) {
    const int groups = d >> gs, sh = gs - 5, blocks = d / QBLOCK;
    float sbuf[FLASH_MAX_GROUPS + 8];
    __m256 bacc = _mm256_setzero_ps();
    for (int g = 0; g < groups; g += 8) {
        const int n = groups - g < 8 ? groups - g : 8;
        const __m256 sc = n == 8 ? load8s(sv, g, sdt) : load8s_tail(sv, g, n, sdt);
        __m256 z = n == 8 ? load8s(zv, g, sdt) : load8s_tail(zv, g, n, sdt);
#if !FLASH_VNNI
        z = _mm256_fmadd_ps(sc, _mm256_set1_ps(128.0f), z);
#endif
        _mm256_storeu_ps(sbuf + g, sc);
        bacc = _mm256_fmadd_ps(z, _mm256_loadu_ps(x.xsg + g), bacc);
    }
    const __m256i sidx = _mm256_setr_epi32(0, 1 >> sh, 2 >> sh, 3 >> sh, 4 >> sh, 5 >> sh,
                                           6 >> sh, 7 >> sh);
    int b = 0;
    for (; b + 8 <= blocks; b += 8) {  // block b + k's group is (b >> sh) + (k >> sh)
        __m256 sc = _mm256_loadu_ps(sbuf + (b >> sh));
        if (sh) sc = _mm256_permutevar8x32_ps(sc, sidx);
        _mm256_storeu_ps(cbuf + b, _mm256_mul_ps(sc, _mm256_loadu_ps(x.dx + b)));
    }
    for (; b < blocks; b++) cbuf[b] = sbuf[b >> sh] * x.dx[b];
    return hsum8(bacc);
}

// acc += block b of an 8-bit row against xq, times cbuf[b].
static inline __m256 q8_block(const uint8_t *w, const int8_t *xq, const float *cbuf, int b,
                              __m256 acc) {
    int shifted;
    const __m256i i = dot_bytes(_mm256_loadu_si256((const __m256i *)(w + 32 * b)),
                                _mm256_loadu_si256((const __m256i *)(xq + 32 * b)), &shifted);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_broadcast_ss(cbuf + b), acc);
}

// dot_row_i8 of an 8-bit row, groups of 2^gs (32 <= group <= 256), d a multiple of 32: one
// dot_bytes per 32-block (VNNI: one dpbusd; AVX2: maddubs of w - 128, whose + 128 * sum(x) is
// folded into the biases as z + 128 * s), each block's scale * dx formed 8 at a time into a
// table first and broadcast from it, the biases' term one vector dot with the token's per-group
// sums (xsg), as in dot_q4_row. (The generic loop converted a scale and a bias per block with
// scalar loads and added three scalar terms, one chain: the 0.5B's carried dir - every FFN,
// attention and lm_head row 8-bit - streamed its FFN at 7 GB/s, issue 20 session 12.)
static inline float dot_q8_row(const uint8_t *w, const void *sv, const void *zv, int sdt, int d,
                               int gs, QX x) {
    const int blocks = d / QBLOCK;
    float cbuf[FLASH_MAX_GROUPS];
    const float bias = q8_prepare(sv, zv, sdt, d, gs, x, cbuf);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int b = 0;
    for (; b + 2 <= blocks; b += 2) {
        a0 = q8_block(w, x.q, cbuf, b, a0);
        a1 = q8_block(w, x.q, cbuf, b + 1, a1);
    }
    if (b < blocks) a0 = q8_block(w, x.q, cbuf, b, a0);
    return hsum8(_mm256_add_ps(a0, a1)) + bias;
}

// dot_q8_row of two rows against one token (an FFN's gate and up), in one pass.
static inline void dot_q8_rows2(const uint8_t *wa, const void *sa, const void *za,
                                const uint8_t *wb, const void *sb, const void *zb, int sdt,
                                int d, int gs, QX x, float *outa, float *outb) {
    const int blocks = d / QBLOCK;
    float ca[FLASH_MAX_GROUPS], cb[FLASH_MAX_GROUPS];
    const float biasa = q8_prepare(sa, za, sdt, d, gs, x, ca);
    const float biasb = q8_prepare(sb, zb, sdt, d, gs, x, cb);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    int b = 0;
    for (; b + 2 <= blocks; b += 2) {
        a0 = q8_block(wa, x.q, ca, b, a0);
        b0 = q8_block(wb, x.q, cb, b, b0);
        a1 = q8_block(wa, x.q, ca, b + 1, a1);
        b1 = q8_block(wb, x.q, cb, b + 1, b1);
    }
    if (b < blocks) {
        a0 = q8_block(wa, x.q, ca, b, a0);
        b0 = q8_block(wb, x.q, cb, b, b0);
    }
    *outa = hsum8(_mm256_add_ps(a0, a1)) + biasa;
    *outb = hsum8(_mm256_add_ps(b0, b1)) + biasb;
}
#endif

#if FLASH_VECTOR
// dot_q8_rows2 against 4 tokens (a prompt): each 32-block of both rows loaded once for the 4
// tokens, each token's block once for both rows, the rows' scales widened once (dot_q8_row
// formed a row's scale * dx table for every token) and the biases' term taken per group.
static inline void dot_q8_rows2_t4(const uint8_t *wa, const void *sa, const void *za,
                                   const uint8_t *wb, const void *sb, const void *zb, int sdt,
                                   int d, int gs, const QX *x, float *outa, float *outb) {
    const int groups = d >> gs, sh = gs - 5, blocks = d / QBLOCK;
    float bufa[FLASH_MAX_GROUPS + 8], bufb[FLASH_MAX_GROUPS + 8];
    // the biases as f32 (plus 128 * the scales where dot_bytes shifts the weights)
    float za32[FLASH_MAX_GROUPS + 8], zb32[FLASH_MAX_GROUPS + 8];
    for (int g = 0; g < groups; g += 8) {
        const int n = groups - g < 8 ? groups - g : 8;
        const __m256 s_a = n == 8 ? load8s(sa, g, sdt) : load8s_tail(sa, g, n, sdt);
        const __m256 s_b = n == 8 ? load8s(sb, g, sdt) : load8s_tail(sb, g, n, sdt);
        __m256 z_a = n == 8 ? load8s(za, g, sdt) : load8s_tail(za, g, n, sdt);
        __m256 z_b = n == 8 ? load8s(zb, g, sdt) : load8s_tail(zb, g, n, sdt);
#if !FLASH_VNNI
        z_a = _mm256_fmadd_ps(s_a, _mm256_set1_ps(128.0f), z_a);
        z_b = _mm256_fmadd_ps(s_b, _mm256_set1_ps(128.0f), z_b);
#endif
        _mm256_storeu_ps(bufa + g, s_a);
        _mm256_storeu_ps(bufb + g, s_b);
        _mm256_storeu_ps(za32 + g, z_a);
        _mm256_storeu_ps(zb32 + g, z_b);
    }
    __m256 A[4], B[4];
    for (int t = 0; t < 4; t++) A[t] = B[t] = _mm256_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        const __m256i qa = _mm256_loadu_si256((const __m256i *)(wa + 32 * b));
        const __m256i qb = _mm256_loadu_si256((const __m256i *)(wb + 32 * b));
        const float scale_a = bufa[b >> sh], scale_b = bufb[b >> sh];
        for (int t = 0; t < 4; t++) {
            const __m256i xq = _mm256_loadu_si256((const __m256i *)(x[t].q + 32 * b));
            int shifted;
            const __m256i ia = dot_bytes(qa, xq, &shifted), ib = dot_bytes(qb, xq, &shifted);
            const float dxb = x[t].dx[b];
            A[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia), _mm256_set1_ps(scale_a * dxb), A[t]);
            B[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ib), _mm256_set1_ps(scale_b * dxb), B[t]);
        }
    }
    for (int t = 0; t < 4; t++) {
        outa[t] = hsum8(A[t]);
        outb[t] = hsum8(B[t]);
    }
    bias_terms4(za32, zb32, DT_F32, groups, x, outa, outb);
}
#endif


// One quantized row (scales sv, biases zv stored as sdt, groups of `group`) dotted with one
// token. The scales are read where used: widening a row's first cost more than its dot.
static inline float dot_row_i8(const uint8_t *w, const void *sv, const void *zv, int sdt, int d,
                               int bits, int group, QX x) {
    float out = 0.0f;
    int c = 0;
#if FLASH_VECTOR
    const int gs = __builtin_ctz((unsigned)group);
    if (bits == 4 && gs >= 5 && gs <= 8 && (d >> gs) <= FLASH_MAX_GROUPS)
        return dot_q4_row(w, sv, zv, sdt, d, gs, x);
    if (bits == 8 && q8_row_fits(d, gs)) return dot_q8_row(w, sv, zv, sdt, d, gs, x);
    if (bits == 4) {  // two accumulators: one FMA chain per row was its latency bound
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0;  // b0: the biases' term
#if FLASH_512
        __m512 a512 = _mm512_setzero_ps(), b512 = a512;
        for (; c + 128 <= d; c += 128) {  // chunks c and c + 64 in the two 256-bit halves
            const __m512i m4 = _mm512_set1_epi8(0x0f);
            __m512i v = _mm512_loadu_si512((const void *)(w + c / 2));
            __m512i lo = _mm512_and_si512(v, m4);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            __m512i xlo = load_halves(x.q + c, x.q + c + 64);
            __m512i xhi = load_halves(x.q + c + 32, x.q + c + 96);
            __m512i i = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo),
                                            hi, xhi);
            __m512 ws = _mm512_insertf32x8(_mm512_castps256_ps512(chunk_scales(sv, c, gs, sdt)),
                                           chunk_scales(sv, c + 64, gs, sdt), 1);
            __m512 zs = _mm512_insertf32x8(_mm512_castps256_ps512(chunk_scales(zv, c, gs, sdt)),
                                           chunk_scales(zv, c + 64, gs, sdt), 1);
            a512 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i),
                                   _mm512_mul_ps(ws, _mm512_loadu_ps(x.dxl + c / 8)), a512);
            b512 = _mm512_fmadd_ps(zs, _mm512_loadu_ps(x.xsl + c / 8), b512);
        }
        out = _mm512_reduce_add_ps(_mm512_add_ps(a512, b512));
#endif
        for (; c + 128 <= d; c += 128) {
            a0 = chunk_fma(chunk_q4(w, c, x.q), chunk_scales(sv, c, gs, sdt), x.dxl, c, a0);
            a1 = chunk_fma(chunk_q4(w, c + 64, x.q), chunk_scales(sv, c + 64, gs, sdt), x.dxl,
                           c + 64, a1);
            b0 = chunk_bias(zv, c, gs, sdt, x.xsl, b0);
            b0 = chunk_bias(zv, c + 64, gs, sdt, x.xsl, b0);
        }
        for (; c + 64 <= d; c += 64) {
            a0 = chunk_fma(chunk_q4(w, c, x.q), chunk_scales(sv, c, gs, sdt), x.dxl, c, a0);
            b0 = chunk_bias(zv, c, gs, sdt, x.xsl, b0);
        }
        out += hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), b0));
    } else {
        __m256 acc = _mm256_setzero_ps();
        for (; c + 32 <= d; c += 32) {
            int shifted;
            __m256i i = dot_bytes(_mm256_loadu_si256((const __m256i *)(w + c)),
                                  _mm256_loadu_si256((const __m256i *)(x.q + c)), &shifted);
            float sc = scale_at(sv, c >> gs, sdt) * x.dx[c / QBLOCK];
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(sc), acc);
            if (shifted) out += sc * 128.0f * (float)x.isum[c / QBLOCK];
            out += scale_at(zv, c >> gs, sdt) * x.dx[c / QBLOCK] * (float)x.isum[c / QBLOCK];
        }
        out += hsum8(acc);
    }
#endif
    return out + dot_row_rest(w, sv, zv, sdt, d, bits, group, x, c);
}

#if FLASH_VECTOR
// y[0:16] += a * (16 unsigned bytes as f32).
static inline void axpy_bytes(float a, __m128i bytes, float *y) {
#if FLASH_512
    __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
    _mm512_storeu_ps(y, _mm512_fmadd_ps(_mm512_set1_ps(a), q, _mm512_loadu_ps(y)));
#else
    __m256 av = _mm256_set1_ps(a);
    __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
    __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)));
    _mm256_storeu_ps(y, _mm256_fmadd_ps(av, q0, _mm256_loadu_ps(y)));
    _mm256_storeu_ps(y + 8, _mm256_fmadd_ps(av, q1, _mm256_loadu_ps(y + 8)));
#endif
}
#endif

// y (packed order) += h * scale * q over one quantized row; the biases' part (h * biases[g]
// per group) the caller accumulates per group.
static inline void axpy_row_q(float h, const uint8_t *w, const void *sv, int sdt, int d,
                              int bits, int group, float *y) {
    const int gs = __builtin_ctz((unsigned)group);
    int c = 0;
    if (bits == 4) {
#if FLASH_VECTOR
        for (; c + 64 <= d; c += 64) {
            __m256i lo, hi;
            nibbles256(w + c / 2, &lo, &hi);
            float a0 = h * scale_at(sv, c >> gs, sdt), a1 = h * scale_at(sv, (c + 32) >> gs, sdt);
            __m128i part[4] = {_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1),
                               _mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)};
            for (int p = 0; p < 4; p++)  // p: lo 0-15, lo 16-31, hi 0-15, hi 16-31
                axpy_bytes(p & 1 ? a1 : a0, part[p], y + c + p * 16);
        }
#endif
        for (; c + 64 <= d; c += 64) {
            const uint8_t *wb = w + c / 2;
            float a0 = h * scale_at(sv, c >> gs, sdt), a1 = h * scale_at(sv, (c + 32) >> gs, sdt);
            for (int k = 0; k < 32; k++) {
                float a = k < 16 ? a0 : a1;
                y[c + k] += a * (float)(wb[k] & 15);
                y[c + 32 + k] += a * (float)(wb[k] >> 4);
            }
        }
        for (; c < d; c += 32) {
            const uint8_t *wb = w + c / 2;
            float a = h * scale_at(sv, c >> gs, sdt);
            for (int k = 0; k < 16; k++) {
                y[c + k] += a * (float)(wb[k] & 15);
                y[c + 16 + k] += a * (float)(wb[k] >> 4);
            }
        }
    } else {
#if FLASH_VECTOR
        for (; c + 32 <= d; c += 32) {
            float a = h * scale_at(sv, c >> gs, sdt);
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + c));
            __m128i half[2] = {_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)};
            axpy_bytes(a, half[0], y + c);
            axpy_bytes(a, half[1], y + c + 16);
        }
#endif
        for (; c < d; c++) y[c] += h * scale_at(sv, c >> gs, sdt) * (float)w[c];
    }
}

// One quantized row's scales or biases as f32: `a` when already f32, else widened into buf.
static inline const float *row_f32(const void *a, size_t row, int groups, int dt, float *buf) {
    if (dt == DT_F32) return (const float *)a + row * groups;
    widen((const uint16_t *)a + row * groups, groups, dt, buf);
    return buf;
}

// The scratch of the int8 activations: xq, dx, dxl, isum (see quantize_x) in one allocation.
typedef struct {
    int8_t *q;
    float *dx, *dxl, *xsl, *xsg;
    int32_t *isum;
    int gstride;  // xsg's floats per token: d / group rounded up to a multiple of 8
    void *mem;
} QXBuf;

// Allocates the scratch and quantizes x into it (quantize_x), with the per-group sums of the
// quantized x for groups of `group` (a multiple of QBLOCK) in xsg; 0 if malloc failed.
static int qx_prepare(QXBuf *b, const float *x, int T, int d, int bits, int group) {
    size_t blocks = (size_t)T * (d / QBLOCK), n = (size_t)T * d;
    const int groups = d / group, per = group / QBLOCK;
    b->gstride = (groups + 7) & ~7;
    size_t gs = (size_t)T * b->gstride;
    b->mem = malloc(n + sizeof(float) * (blocks + n / 4 + gs) + sizeof(int32_t) * blocks);
    if (!b->mem) return 0;
    b->dx = (float *)b->mem;
    b->dxl = b->dx + blocks;
    b->xsl = b->dxl + n / 8;
    b->xsg = b->xsl + n / 8;
    b->isum = (int32_t *)(b->xsg + gs);
    b->q = (int8_t *)(b->isum + blocks);
    quantize_x(x, T, d, bits, b->q, b->dx, b->dxl, b->xsl, b->isum);
    const int nb = d / QBLOCK;
    for (int t = 0; t < T; t++) {
        float *xs = b->xsg + (size_t)t * b->gstride;
        for (int g = 0; g < b->gstride; g++) {
            float sum = 0.0f;
            for (int k = 0; g < groups && k < per; k++) {
                size_t at = (size_t)t * nb + (size_t)g * per + k;
                sum += b->dx[at] * (float)b->isum[at];
            }
            xs[g] = sum;
        }
    }
    return 1;
}

static inline QX qx_token(const QXBuf *b, int d, int t) {
    QX r = {b->q + (size_t)t * d, b->dx + (size_t)t * (d / QBLOCK), b->dxl + (size_t)t * (d / 8),
            b->xsl + (size_t)t * (d / 8), b->isum + (size_t)t * (d / QBLOCK),
            b->xsg + (size_t)t * b->gstride};
    return r;
}

#if FLASH_VECTOR
// Whether rows2_tokens takes d-wide rows of `bits` in groups of 2^gs.
static inline int rows2_fit(int bits, int d, int gs) {
    return (bits == 4 && gs >= 5 && gs <= 8 && (d >> gs) <= FLASH_MAX_GROUPS)
           || (bits == 8 && q8_row_fits(d, gs));
}

// Rows a and b (an FFN's gate and up, or two rows of a matrix) against tokens t0 .. t0 + nt
// of qb: 4 at a time through the 4-token passes, the rest one at a time.
static inline void rows2_tokens(const uint8_t *wa, const void *sa, const void *za,
                                const uint8_t *wb, const void *sb, const void *zb, int sdt,
                                int d, int gs, int bits, const QXBuf *qb, int t0, int nt,
                                float *outa, float *outb) {
    int t = 0;
    for (; t + 4 <= nt; t += 4) {
        const QX x4[4] = {qx_token(qb, d, t0 + t), qx_token(qb, d, t0 + t + 1),
                          qx_token(qb, d, t0 + t + 2), qx_token(qb, d, t0 + t + 3)};
        if (bits == 4)
            dot_q4_rows2_t4(wa, sa, za, wb, sb, zb, sdt, d, gs, x4, outa + t, outb + t);
        else
            dot_q8_rows2_t4(wa, sa, za, wb, sb, zb, sdt, d, gs, x4, outa + t, outb + t);
    }
    for (; t < nt; t++) {
        const QX x = qx_token(qb, d, t0 + t);
        if (bits == 4)
            dot_q4_rows2(wa, sa, za, wb, sb, zb, sdt, d, gs, x, outa + t, outb + t);
        else
            dot_q8_rows2(wa, sa, za, wb, sb, zb, sdt, d, gs, x, outa + t, outb + t);
    }
}
#endif

// out[t] = row . x[t0 + t] for t < nt: 4-bit rows take 4 tokens per pass over the row (its
// nibbles decoded once, four independent FMA chains).
static inline void dot_tokens_i8(const uint8_t *w, const void *sv, const void *zv, int sdt,
                                 int d, int bits, int group, const QXBuf *qb, int t0, int nt,
                                 float *out) {
#if FLASH_VECTOR
    if (bits == 4 && nt == 4) {
        const int gs = __builtin_ctz((unsigned)group);
        QX x0 = qx_token(qb, d, t0), x1 = qx_token(qb, d, t0 + 1),
           x2 = qx_token(qb, d, t0 + 2), x3 = qx_token(qb, d, t0 + 3);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        int c = 0;
        for (; c + 64 <= d; c += 64) {
            __m256i lo, hi;
            nibbles256(w + c / 2, &lo, &hi);
            __m256 ws = chunk_scales(sv, c, gs, sdt), zs = chunk_scales(zv, c, gs, sdt);
#define FLASH_TOKEN(a, b, x)                                                                     \
    a = chunk_fma(dot_nibbles(lo, _mm256_loadu_si256((const __m256i *)(x.q + c)), hi,            \
                              _mm256_loadu_si256((const __m256i *)(x.q + c + 32))),              \
                  ws, x.dxl, c, a);                                                              \
    b = _mm256_fmadd_ps(zs, _mm256_loadu_ps(x.xsl + c / 8), b)
            FLASH_TOKEN(a0, b0, x0);
            FLASH_TOKEN(a1, b1, x1);
            FLASH_TOKEN(a2, b2, x2);
            FLASH_TOKEN(a3, b3, x3);
#undef FLASH_TOKEN
        }
        out[0] = hsum8(_mm256_add_ps(a0, b0)) + dot_row_rest(w, sv, zv, sdt, d, bits, group, x0, c);
        out[1] = hsum8(_mm256_add_ps(a1, b1)) + dot_row_rest(w, sv, zv, sdt, d, bits, group, x1, c);
        out[2] = hsum8(_mm256_add_ps(a2, b2)) + dot_row_rest(w, sv, zv, sdt, d, bits, group, x2, c);
        out[3] = hsum8(_mm256_add_ps(a3, b3)) + dot_row_rest(w, sv, zv, sdt, d, bits, group, x3, c);
        return;
    }
#endif
    for (int t = 0; t < nt; t++)
        out[t] = dot_row_i8(w, sv, zv, sdt, d, bits, group, qx_token(qb, d, t0 + t));
}

#define Q8_PAIR_MAX_D 1024  // linear_q takes 8-bit rows two at a time up to this width

static void linear_q_i8(const uint32_t *Wq, const void *scales, const void *biases, int sdt,
                        int rows, int d, int group, int bits, int T, const float *b, float *y,
                        const QXBuf *qb) {
    const int words = d * bits / 32, groups = d / group;
#if FLASH_VECTOR
    const int gs = __builtin_ctz((unsigned)group);
    // 8-bit rows in pairs too where they are short: the 0.5B's lm_head (151936 x 896) 9.6 ->
    // 7.3 ms a token, but at d 1536 pairs were 10.5 -> 12.8 ms (one row at a time already
    // streams 25 GB/s there; session 15's EPYC, one thread)
    if (T == 1 && ((bits == 4 && gs >= 5 && gs <= 8 && groups <= FLASH_MAX_GROUPS)
                   || (bits == 8 && d <= Q8_PAIR_MAX_D && q8_row_fits(d, gs)))) {
        const size_t srow = (size_t)groups * (sdt == DT_F32 ? 4 : 2);
        const QX x0 = qx_token(qb, d, 0);
#pragma omp parallel for schedule(dynamic, 32)
        for (int r = 0; r < rows - 1; r += 2) {  // two rows per pass over x (decode)
            const char *s = (const char *)scales + (size_t)r * srow;
            const char *z = (const char *)biases + (size_t)r * srow;
            const uint8_t *w = (const uint8_t *)(Wq + (size_t)r * words);
            float o0, o1;
            if (r + FLASH_AHEAD + 1 < rows) {  // the pair FLASH_AHEAD rows on
                prefetch_bytes(w + (size_t)FLASH_AHEAD * words * 4, (size_t)2 * words * 4);
                prefetch_bytes(s + FLASH_AHEAD * srow, 2 * srow);
                prefetch_bytes(z + FLASH_AHEAD * srow, 2 * srow);
            }
            if (bits == 4)
                dot_q4_rows2(w, s, z, w + (size_t)words * 4, s + srow, z + srow, sdt, d, gs, x0,
                             &o0, &o1);
            else
                dot_q8_rows2(w, s, z, w + (size_t)words * 4, s + srow, z + srow, sdt, d, gs, x0,
                             &o0, &o1);
            y[r] = o0 + (b ? b[r] : 0.0f);
            y[r + 1] = o1 + (b ? b[r + 1] : 0.0f);
        }
        if (rows % 2) {
            const int r = rows - 1;
            y[r] = dot_row_i8((const uint8_t *)(Wq + (size_t)r * words),
                              (const char *)scales + (size_t)r * srow,
                              (const char *)biases + (size_t)r * srow, sdt, d, bits, group, x0)
                   + (b ? b[r] : 0.0f);
        }
        return;
    }
    // A prompt's rows in pairs, 4 tokens a pass (dot_q4_rows2_t4 / dot_q8_rows2_t4): each
    // pair's weights loaded (and nibbles decoded) once for 4 tokens, where dot_row_i8 took
    // every row once per token.
    if (T >= 4 && rows2_fit(bits, d, gs)) {
        const size_t srow = (size_t)groups * (sdt == DT_F32 ? 4 : 2);
#pragma omp parallel for schedule(dynamic, 16)
        for (int r = 0; r < rows - 1; r += 2) {
            const char *s = (const char *)scales + (size_t)r * srow;
            const char *z = (const char *)biases + (size_t)r * srow;
            const uint8_t *w = (const uint8_t *)(Wq + (size_t)r * words);
            if (r + FLASH_AHEAD + 1 < rows) {
                prefetch_bytes(w + (size_t)FLASH_AHEAD * words * 4, (size_t)2 * words * 4);
                prefetch_bytes(s + FLASH_AHEAD * srow, 2 * srow);
                prefetch_bytes(z + FLASH_AHEAD * srow, 2 * srow);
            }
            const float b0 = b ? b[r] : 0.0f, b1 = b ? b[r + 1] : 0.0f;
            for (int t0 = 0; t0 < T; t0 += 8) {
                const int nt = T - t0 < 8 ? T - t0 : 8;
                float o0[8], o1[8];
                rows2_tokens(w, s, z, w + (size_t)words * 4, s + srow, z + srow, sdt, d, gs, bits,
                             qb, t0, nt, o0, o1);
                for (int u = 0; u < nt; u++) {
                    y[(size_t)(t0 + u) * rows + r] = o0[u] + b0;
                    y[(size_t)(t0 + u) * rows + r + 1] = o1[u] + b1;
                }
            }
        }
        if (rows % 2) {
            const int r = rows - 1;
            for (int t = 0; t < T; t++)
                y[(size_t)t * rows + r] = dot_row_i8((const uint8_t *)(Wq + (size_t)r * words),
                                                     (const char *)scales + (size_t)r * srow,
                                                     (const char *)biases + (size_t)r * srow,
                                                     sdt, d, bits, group, qx_token(qb, d, t))
                                          + (b ? b[r] : 0.0f);
        }
        return;
    }
#endif
#pragma omp parallel for schedule(dynamic, 64)
        for (int r = 0; r < rows; r++) {
            const size_t at = (size_t)r * groups * (sdt == DT_F32 ? 4 : 2);
            const char *s = (const char *)scales + at, *z = (const char *)biases + at;
            const uint8_t *w = (const uint8_t *)(Wq + (size_t)r * words);
            if (r + FLASH_AHEAD < rows) {
                const size_t srow = (size_t)groups * (sdt == DT_F32 ? 4 : 2);
                prefetch_bytes(w + (size_t)FLASH_AHEAD * words * 4, (size_t)words * 4);
                prefetch_bytes(s + FLASH_AHEAD * srow, srow);
                prefetch_bytes(z + FLASH_AHEAD * srow, srow);
            }
            for (int t = 0; t < T; t++) {
                QX xt = qx_token(qb, d, t);
                y[(size_t)t * rows + r] = dot_row_i8(w, s, z, sdt, d, bits, group, xt)
                                          + (b ? b[r] : 0.0f);
        }
    }
}

static void linear_q_exact(const uint32_t *Wq, const void *scales, const void *biases, int sdt,
                           int rows, int d, int bits, int group, const float *x, int T,
                           const float *xsum, const float *b, float *y) {
    const int words = d * bits / 32, groups = d / group;
#pragma omp parallel
    {
        float sbuf[FLASH_MAX_GROUPS], zbuf[FLASH_MAX_GROUPS];
#pragma omp for schedule(dynamic, 64)
        for (int r = 0; r < rows; r++) {
            const float *s = row_f32(scales, (size_t)r, groups, sdt, sbuf);
            const float *z = row_f32(biases, (size_t)r, groups, sdt, zbuf);
            float out[8];
            for (int t0 = 0; t0 < T; t0 += 8) {
                int nt = T - t0 < 8 ? T - t0 : 8;
                dotq_tokens(Wq + (size_t)r * words, s, z, d, bits, group, x + (size_t)t0 * d,
                            xsum + (size_t)t0 * groups, nt, out);
                for (int t = 0; t < nt; t++)
                    y[(size_t)(t0 + t) * rows + r] = out[t] + (b ? b[r] : 0.0f);
            }
        }
    }
}

// y (T, rows) = x (T, d) times MLX affine-quantized rows: Wq (rows, d * bits / 32) uint32,
// scales / biases (rows, d / group) in sdt (DT_F16, DT_BF16 or DT_F32); xsum (T, d / group) the
// group sums of x; b (rows,) or NULL. exact: f32 activations, else int8 (see above). Returns 0,
// or -1 if the scratch could not be allocated.
int linear_q(const uint32_t *Wq, const void *scales, const void *biases, int sdt, int rows,
             int d, int bits, int group, const float *x, int T, const float *xsum, const float *b,
             float *y, int exact) {
    if (exact || d % QBLOCK || group % QBLOCK || (group & (group - 1))) {
        linear_q_exact(Wq, scales, biases, sdt, rows, d, bits, group, x, T, xsum, b, y);
        return 0;
    }
    QXBuf qb;
    if (!qx_prepare(&qb, x, T, d, bits, group)) return -1;
    linear_q_i8(Wq, scales, biases, sdt, rows, d, group, bits, T, b, y, &qb);
    free(qb.mem);
    return 0;
}

// Inside a parallel region: y (T, d) natural order = the threads' packed-order partial sums
// plus their per-group bias sums bsum (threads, T, d / group).
static void sum_partials_packed(const float *partial, const float *bsum, int threads, int T,
                                int d, int bits, int group, float *y) {
    const size_t count = (size_t)T * d, groups = d / group;
#pragma omp for schedule(static)
    for (int i = 0; i < d; i++) {
        size_t p = packed_pos(i, d, bits), g = i / group;
        for (int t = 0; t < T; t++) {
            float sum = 0.0f;
            for (int k = 0; k < threads; k++)
                sum += partial[(size_t)k * count + (size_t)t * d + p]
                       + bsum[((size_t)k * T + t) * groups + g];
            y[(size_t)t * d + i] = sum;
        }
    }
}

#define FLASH_DOWN_BATCH 32  // down rows / columns per batched pass (ffnq_i8, ffnp)
#define FLASH_INT_DOWN 16  // 4-bit rows per integer pass: 8 pairs of 15 * 127 * 2 fit int16

// y (packed order) += sum_k h[k] * scale_k * q_k over a batch of m 4-bit down rows (along d,
// groups of 2^gs, scales sc[k] 16-bit dt): tiles of 64 outputs in registers, so y is loaded
// and stored once per batch rather than once per row; the biases' part (h * biases[g]) the
// caller sums per group. A last 32-element chunk (d % 64 == 32) goes row by row, scalar.
static void down_rows_q4(const uint8_t *const *rows, const uint16_t *const *sc, const float *h,
                         int m, int dt, int d, int gs, float *y, int c) {
#if FLASH_VECTOR
    for (; c + 64 <= d; c += 64) {
        const int g0 = c >> gs, g1 = (c + 32) >> gs;
        __m256 a[8];
        for (int r = 0; r < 8; r++) a[r] = _mm256_setzero_ps();
        for (int k = 0; k < m; k++) {
            const uint8_t *wb = rows[k] + c / 2;
            _mm_prefetch((const char *)wb + 128, _MM_HINT_T0);  // 4 tiles ahead
            const float f0 = h[k] * scale_at(sc[k], g0, dt);
            const __m256 s0 = _mm256_set1_ps(f0);
            const __m256 s1 = g1 == g0 ? s0 : _mm256_set1_ps(h[k] * scale_at(sc[k], g1, dt));
            __m256i lo, hi;
            nibbles256(wb, &lo, &hi);
            // lo bytes 0-15 -> y[c, c + 16), 16-31 -> [c + 16, c + 32); hi -> c + 32 on
            const __m128i part[4] = {_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1),
                                     _mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)};
            for (int p = 0; p < 4; p++) {
                const __m256 sv = p & 1 ? s1 : s0;
                a[2 * p] = _mm256_fmadd_ps(sv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part[p])),
                                           a[2 * p]);
                a[2 * p + 1] = _mm256_fmadd_ps(
                    sv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(part[p], 8))),
                    a[2 * p + 1]);
            }
        }
        for (int r = 0; r < 8; r++)
            _mm256_storeu_ps(y + c + 8 * r, _mm256_add_ps(_mm256_loadu_ps(y + c + 8 * r), a[r]));
    }
#endif
    for (; c + 64 <= d; c += 64)  // the scalar build
        for (int k = 0; k < m; k++) {
            const uint8_t *wb = rows[k] + c / 2;
            float a0 = h[k] * scale_at(sc[k], c >> gs, dt);
            float a1 = h[k] * scale_at(sc[k], (c + 32) >> gs, dt);
            for (int i = 0; i < 32; i++) {
                float a = i < 16 ? a0 : a1;
                y[c + i] += a * (float)(wb[i] & 15);
                y[c + 32 + i] += a * (float)(wb[i] >> 4);
            }
        }
    for (; c < d; c += 32)
        for (int k = 0; k < m; k++) {
            const uint8_t *wb = rows[k] + c / 2;
            float a = h[k] * scale_at(sc[k], c >> gs, dt);
            for (int i = 0; i < 16; i++) {
                y[c + i] += a * (float)(wb[i] & 15);
                y[c + 16 + i] += a * (float)(wb[i] >> 4);
            }
        }
}

// down_rows_q4 with integer products, m <= FLASH_INT_DOWN rows: each row's coefficient for
// group g, h[k] * scale_k[g], is quantized to int8 per group over the batch (c ~ D[g] * cq,
// D[g] = max_k |c| / 127), two rows' nibbles are interleaved byte by byte so one maddubs takes
// 2 rows x 16 elements, and the int16 sums (at most 8 pairs of 15 * 127 * 2) are widened once
// per 64-element tile, times D. Output in packed order like down_rows_q4; columns [0, d - d %
// 64) (returns where it stopped; the caller's f32 loop does the rest).
static int down_rows_q4i(const uint8_t *const *rows, const uint16_t *const *sc, const float *h,
                         int m, int dt, int d, int gs, float *y) {
    int c = 0;
#if FLASH_VECTOR
    const int groups = d >> gs, pairs = (m + 1) / 2, g8 = (groups + 7) & ~7;
    if (groups > FLASH_MAX_GROUPS) return 0;
    // the coefficients, 8 groups at a time (a row's scales are contiguous); pad rows are 0
    float coef[FLASH_INT_DOWN][FLASH_MAX_GROUPS], dg[FLASH_MAX_GROUPS];
    int16_t pq[FLASH_INT_DOWN / 2][FLASH_MAX_GROUPS];
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int g = 0; g < g8; g += 8) _mm256_storeu_ps(dg + g, _mm256_setzero_ps());
    for (int k = 0; k < 2 * pairs; k++) {
        const __m256 hv = _mm256_set1_ps(k < m ? h[k] : 0.0f);
        for (int g = 0; g < g8; g += 8) {
            __m256 sv = g + 8 <= groups ? load8(sc[k < m ? k : 0] + g, dt)
                                        : load8s_tail(sc[k < m ? k : 0], g, groups - g, dt);
            __m256 cv = _mm256_mul_ps(hv, sv);
            _mm256_storeu_ps(coef[k] + g, cv);
            _mm256_storeu_ps(dg + g, _mm256_max_ps(_mm256_loadu_ps(dg + g),
                                                  _mm256_and_ps(cv, absmask)));
        }
    }
    for (int g = 0; g < g8; g += 8) {
        const __m256 mx = _mm256_loadu_ps(dg + g);
        const __m256 inv = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(127.0f), mx),
                                         _mm256_cmp_ps(mx, _mm256_setzero_ps(), _CMP_GT_OQ));
        for (int pr = 0; pr < pairs; pr++) {  // (a & 0xff) | b << 8 as int16
            __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(coef[2 * pr] + g), inv));
            __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(coef[2 * pr + 1] + g), inv));
            __m256i v = _mm256_or_si256(_mm256_and_si256(a, _mm256_set1_epi32(0xff)),
                                        _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0xff)), 8));
            __m128i v16 = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
            _mm_storeu_si128((__m128i *)(pq[pr] + g), v16);
        }
        _mm256_storeu_ps(dg + g, _mm256_mul_ps(mx, _mm256_set1_ps(1.0f / 127.0f)));
    }
    const uint8_t *rp[FLASH_INT_DOWN];
    for (int k = 0; k < 2 * pairs; k++) rp[k] = rows[k < m ? k : m - 1];
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    for (; c + 64 <= d; c += 64) {
        const int g0 = c >> gs, g1 = (c + 32) >> gs;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        for (int pr = 0; pr < pairs; pr++) {
            const __m256i cf = g0 == g1 ? _mm256_set1_epi16(pq[pr][g0])
                                        : _mm256_set_m128i(_mm_set1_epi16(pq[pr][g1]),
                                                           _mm_set1_epi16(pq[pr][g0]));
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)(rp[2 * pr] + c / 2));
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(rp[2 * pr + 1] + c / 2));
            const __m256i l0 = _mm256_and_si256(v0, m4), l1 = _mm256_and_si256(v1, m4);
            const __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), m4);
            const __m256i h1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m4);
            a0 = _mm256_add_epi16(a0, _mm256_maddubs_epi16(_mm256_unpacklo_epi8(l0, l1), cf));
            a1 = _mm256_add_epi16(a1, _mm256_maddubs_epi16(_mm256_unpackhi_epi8(l0, l1), cf));
            a2 = _mm256_add_epi16(a2, _mm256_maddubs_epi16(_mm256_unpacklo_epi8(h0, h1), cf));
            a3 = _mm256_add_epi16(a3, _mm256_maddubs_epi16(_mm256_unpackhi_epi8(h0, h1), cf));
        }
        // packed positions: a0 lanes -> c + 0 / c + 16, a1 c + 8 / c + 24, a2 c + 32 / c + 48,
        // a3 c + 40 / c + 56 (lane 0 is group g0, lane 1 g1)
        const __m256i acc[4] = {a0, a1, a2, a3};
        const int at[4] = {0, 8, 32, 40};
        const __m256 d0 = _mm256_set1_ps(dg[g0]), d1 = _mm256_set1_ps(dg[g1]);
        for (int r = 0; r < 4; r++) {
            float *y0 = y + c + at[r], *y1 = y0 + 16;
            __m256 v0 = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc[r])));
            __m256 v1 = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc[r], 1)));
            _mm256_storeu_ps(y0, _mm256_fmadd_ps(v0, d0, _mm256_loadu_ps(y0)));
            _mm256_storeu_ps(y1, _mm256_fmadd_ps(v1, d1, _mm256_loadu_ps(y1)));
        }
    }
#else
    (void)rows; (void)sc; (void)h; (void)m; (void)dt; (void)d; (void)gs; (void)y;
#endif
    return c;
}

// bsum[0:groups] += v * biases[0:groups] (16-bit dt).
static inline void add_scaled_biases(float v, const uint16_t *z, int groups, int dt,
                                     float *bsum) {
    int g = 0;
#if FLASH_VECTOR
    const __m256 vv = _mm256_set1_ps(v);
    for (; g + 8 <= groups; g += 8)
        _mm256_storeu_ps(bsum + g, _mm256_fmadd_ps(vv, load8(z + g, dt), _mm256_loadu_ps(bsum + g)));
    if (g < groups) {
        float out[8];
        _mm256_storeu_ps(out, _mm256_mul_ps(vv, load8s_tail(z, g, groups - g, dt)));
        for (int k = 0; g + k < groups; k++) bsum[g + k] += out[k];
        return;
    }
#endif
    for (; g < groups; g++) bsum[g] += v * scale_at(z, g, dt);
}

// ffnq with int8 activations. The neurons go in batches of up to FLASH_DOWN_BATCH: their h
// first (gate / up dots, 4 tokens per pass), then - 4-bit rows - their down rows together
// (down_rows_q4); 8-bit rows are added one by one (axpy_row_q).
static int ffnq_i8(const uint32_t *q, const uint16_t *scales, const uint16_t *biases, int dt,
                   int P, int64_t capacity, int n, int d, int bits, int group, const float *x,
                   int T, const float *in_bias, const float *mask, int act, float *h,
                   float *partial, float *y) {
    const int gated = P == 3, words = d * bits / 32, groups = d / group;
    const int gs = __builtin_ctz((unsigned)group);
    const size_t qpart = (size_t)capacity * words, spart = (size_t)capacity * groups;
    const int batches = (n + FLASH_DOWN_BATCH - 1) / FLASH_DOWN_BATCH;
    QXBuf qb;
    if (!qx_prepare(&qb, x, T, d, bits, group)) return -1;
    int threads = 1, failed = 0;
    float *bsum_all = NULL;
#pragma omp parallel
    {
        int tid = team_member(&threads);
        float *hb = (float *)malloc(sizeof(float) * (size_t)T * FLASH_DOWN_BATCH);  // (T, batch)
#pragma omp single
        {
            bsum_all = (float *)calloc((size_t)threads * T * groups, sizeof(float));
            failed = bsum_all == NULL;
        }  // (the single's barrier: every thread sees bsum_all)
        if (!hb) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            float *acc = partial + (size_t)tid * T * d, *bsum = bsum_all + (size_t)tid * T * groups;
            const uint8_t *drow[FLASH_DOWN_BATCH];
            const uint16_t *dsc[FLASH_DOWN_BATCH], *dz[FLASH_DOWN_BATCH];
            memset(acc, 0, sizeof(float) * (size_t)T * d);
#pragma omp for schedule(dynamic, 1)
            for (int bi = 0; bi < batches; bi++) {
                const int j1 = (bi + 1) * FLASH_DOWN_BATCH < n ? (bi + 1) * FLASH_DOWN_BATCH : n;
                int m = 0;
                for (int j = bi * FLASH_DOWN_BATCH; j < j1; j++) {
                    const int ja = j + FLASH_AHEAD;
                    if (ja < n && maybe_needed(mask, T, n, ja))
                        for (int p = 0; p < P; p++) {
                            prefetch_bytes(q + p * qpart + (size_t)ja * words, (size_t)words * 4);
                            prefetch_bytes(scales + p * spart + (size_t)ja * groups, groups * 2);
                            prefetch_bytes(biases + p * spart + (size_t)ja * groups, groups * 2);
                        }
                    if (!needed(mask, h, T, n, j)) continue;
                    const uint16_t *s[3], *z[3];
                    const uint8_t *w[3];
                    for (int p = 0; p < P; p++) {
                        s[p] = scales + p * spart + (size_t)j * groups;
                        z[p] = biases + p * spart + (size_t)j * groups;
                        w[p] = (const uint8_t *)(q + p * qpart + (size_t)j * words);
                    }
                    for (int t0 = 0; t0 < T; t0 += 4) {
                        int nt = T - t0 < 4 ? T - t0 : 4;
                        float first[4], second[4];
#if FLASH_VECTOR
                        if (gated && rows2_fit(bits, d, gs)) {  // gate and up in one pass
                            rows2_tokens(w[0], s[0], z[0], w[1], s[1], z[1], dt, d, gs, bits, &qb,
                                         t0, nt, first, second);
                        } else
#endif
                        {
                            dot_tokens_i8(w[0], s[0], z[0], dt, d, bits, group, &qb, t0, nt,
                                          first);
                            if (gated)
                                dot_tokens_i8(w[1], s[1], z[1], dt, d, bits, group, &qb, t0, nt,
                                              second);
                        }
                        for (int k = 0; k < nt; k++) {
                            int t = t0 + k;
                            float v = activate(first[k] + (in_bias ? in_bias[j] : 0.0f), act);
                            if (gated) v *= second[k] + (in_bias ? in_bias[capacity + j] : 0.0f);
                            if (mask) v *= mask[(size_t)t * n + j];
                            h[(size_t)t * n + j] = v;
                            hb[(size_t)t * FLASH_DOWN_BATCH + m] = v;
                        }
                    }
                    drow[m] = w[P - 1];
                    dsc[m] = s[P - 1];
                    dz[m] = z[P - 1];
                    m++;
                }
                for (int t = 0; t < T && m; t++) {
                    const float *ht = hb + (size_t)t * FLASH_DOWN_BATCH;
                    float *yt = acc + (size_t)t * d, *bt = bsum + (size_t)t * groups;
                    if (bits == 4) {  // integer products, FLASH_INT_DOWN rows at a time
                        for (int k = 0; k < m; k += FLASH_INT_DOWN) {
                            const int mk = m - k < FLASH_INT_DOWN ? m - k : FLASH_INT_DOWN;
                            int done = down_rows_q4i(drow + k, dsc + k, ht + k, mk, dt, d, gs, yt);
                            down_rows_q4(drow + k, dsc + k, ht + k, mk, dt, d, gs, yt, done);
                        }
                    } else {
                        for (int k = 0; k < m; k++)
                            if (ht[k] != 0.0f) axpy_row_q(ht[k], drow[k], dsc[k], dt, d, bits, group, yt);
                    }
                    for (int k = 0; k < m; k++)
                        if (ht[k] != 0.0f) add_scaled_biases(ht[k], dz[k], groups, dt, bt);
                }
            }
            sum_partials_packed(partial, bsum_all, threads, T, d, bits, group, y);
        }
        free(hb);
    }
    free(bsum_all);
    free(qb.mem);
    return failed ? -1 : 0;
}

// ffn16 over the quantized cache: q (P, capacity, d * bits / 32) uint32, scales / biases
// (P, capacity, d / group) 16-bit (dt), neurons [0, n); in_bias (P - 1, capacity) f32 or NULL;
// mask, h, partial and y as in ffn16; xsum (T, d / group) the group sums of x. exact: f32
// activations, else int8. Returns 0, or -1 if scratch could not be allocated.
int ffnq(const uint32_t *q, const uint16_t *scales, const uint16_t *biases, int dt, int P,
         int64_t capacity, int n, int d, int bits, int group, const float *x, int T,
         const float *xsum, const float *in_bias, const float *mask, int act, float *h,
         float *partial, float *y, int exact) {
    if (exact || d % QBLOCK || group % QBLOCK || (group & (group - 1))) {
        ffnq_exact(q, scales, biases, dt, P, capacity, n, d, bits, group, x, T, xsum, in_bias,
                   mask, act, h, partial, y);
        return 0;
    }
    return ffnq_i8(q, scales, biases, dt, P, capacity, n, d, bits, group, x, T, in_bias, mask,
                   act, h, partial, y);
}

// ---------------------------------------------------------------------------------------------
// Format 3 (parts at their own precision, a carried mlx_lm or GGUF checkpoint): gate / up rows
// quantized along d as above, the down part along the neurons - column j's integers with the
// layer's table of per-(group, element) scales and biases, row group_of[j] - so the down
// projection's weight is y[i] += h * (ts[i] * q[i] + tz[i]) with ts, tz that row.
// ---------------------------------------------------------------------------------------------

// The input projections of neuron j for tokens t0 .. t0 + nt (nt <= 8): first (gate, or up of a
// plain FFN) and, gated, second (up). int8 activations through qb, else f32 ones (x, xsum).
static inline void parts_dots(const uint32_t *wg, const uint16_t *sg, const uint16_t *zg,
                              const uint32_t *wu, const uint16_t *su, const uint16_t *zu, int dt,
                              int d, int bits, int group, const QXBuf *qb, const float *x,
                              const float *xsum, int t0, int nt, float *first, float *second) {
    const int groups = d / group;
#if FLASH_VECTOR
    const int gs = __builtin_ctz((unsigned)group);
    if (qb && wu && rows2_fit(bits, d, gs)) {
        rows2_tokens((const uint8_t *)wg, sg, zg, (const uint8_t *)wu, su, zu, dt, d, gs, bits, qb,
                     t0, nt, first, second);
        return;
    }
#endif
    if (qb) {
        for (int k = 0; k < nt; k += 4) {
            int m = nt - k < 4 ? nt - k : 4;
            dot_tokens_i8((const uint8_t *)wg, sg, zg, dt, d, bits, group, qb, t0 + k, m,
                          first + k);
            if (wu)
                dot_tokens_i8((const uint8_t *)wu, su, zu, dt, d, bits, group, qb, t0 + k, m,
                              second + k);
        }
        return;
    }
    float s[FLASH_MAX_GROUPS], z[FLASH_MAX_GROUPS];
    const float *xt = x + (size_t)t0 * d, *st = xsum + (size_t)t0 * groups;
    widen(sg, groups, dt, s);
    widen(zg, groups, dt, z);
    dotq_tokens(wg, s, z, d, bits, group, xt, st, nt, first);
    if (wu) {
        widen(su, groups, dt, s);
        widen(zu, groups, dt, z);
        dotq_tokens(wu, s, z, d, bits, group, xt, st, nt, second);
    }
}

// A batch of down columns (8 or 4 bits, natural order) through the segment's table row: for
// each output element i, y[i] += ts[i] * sum_k h[k] * q_k[i] + tz[i] * sum_k h[k], over the
// batch's m columns cols[k] (tz NULL: a symmetric table, tz = -zero * ts). The output is tiled
// (64 elements of the 8 accumulators in registers) so y is loaded and stored once per batch,
// not once per column (a column at a time stored each 8 floats as two halves and loaded them
// whole for the next: a store-forwarding stall per 8 elements that made the down projection
// most of ffnp's time).
static void down_batch(const uint32_t *const *cols, const float *h, int m, float hs, int bits_d,
                       const uint16_t *ts, const uint16_t *tz, float zero, int dt, int d,
                       float *y, int i) {
#if FLASH_VECTOR
    const __m256 hsv = _mm256_set1_ps(hs), zneg = _mm256_set1_ps(-zero);
    for (; i + 64 <= d; i += 64) {
        __m256 a[8];
        for (int r = 0; r < 8; r++) a[r] = _mm256_setzero_ps();
        for (int k = 0; k < m; k++) {
            const __m256 hv = _mm256_set1_ps(h[k]);
            // the columns are m streams advancing 64 elements per tile: fetch 4 tiles ahead
            _mm_prefetch((const char *)cols[k] + (size_t)(i + 256) * bits_d / 8, _MM_HINT_T0);
            if (bits_d == 8) {
                const uint8_t *c = (const uint8_t *)cols[k] + i;
                for (int r = 0; r < 8; r++)
                    a[r] = _mm256_fmadd_ps(hv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                               _mm_loadl_epi64((const __m128i *)(c + 8 * r)))), a[r]);
            } else {
                for (int r = 0; r < 8; r++)
                    a[r] = _mm256_fmadd_ps(hv, decode8(cols[k], i + 8 * r, 4), a[r]);
            }
        }
        for (int r = 0; r < 8; r++) {
            float *yr = y + i + 8 * r;
            const __m256 sv = load8(ts + i + 8 * r, dt);
            const __m256 zv = tz ? load8(tz + i + 8 * r, dt) : _mm256_mul_ps(sv, zneg);
            __m256 o = _mm256_fmadd_ps(sv, a[r], _mm256_loadu_ps(yr));
            _mm256_storeu_ps(yr, _mm256_fmadd_ps(zv, hsv, o));
        }
    }
    for (; i + 8 <= d; i += 8) {
        __m256 a = _mm256_setzero_ps();
        for (int k = 0; k < m; k++)
            a = _mm256_fmadd_ps(_mm256_set1_ps(h[k]), decode8(cols[k], i, bits_d), a);
        const __m256 sv = load8(ts + i, dt);
        const __m256 zv = tz ? load8(tz + i, dt) : _mm256_mul_ps(sv, zneg);
        __m256 o = _mm256_fmadd_ps(sv, a, _mm256_loadu_ps(y + i));
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(zv, hsv, o));
    }
#endif
    for (; i < d; i++) {
        float a = 0.0f;
        for (int k = 0; k < m; k++) a += h[k] * quant_at(cols[k], i, bits_d);
        const float sv = to_f32(ts[i], dt), zv = tz ? to_f32(tz[i], dt) : -zero * sv;
        y[i] += sv * a + zv * hs;
    }
}


// max |h[k]| over a batch's m coefficients (the scale both integer down batches quantize by).
static inline float abs_max(const float *h, int m) {
    float hmax = 0.0f;
    for (int k = 0; k < m; k++) hmax = fabsf(h[k]) > hmax ? fabsf(h[k]) : hmax;
    return hmax;
}

#if FLASH_VECTOR
// y[e:e + 8] += ts * (sums * dv) + tz * hs: 8 integer sums of a batch's h * q, rescaled by the
// batch's quantization step dv, through the table row (ts, tz) at e; hsv = the batch's sum of h.
// tz NULL: a symmetric table (tz = -zero * ts, zhs = -zero * hs), y += ts * (sums * dv + zhs):
// its bias row is never read (Q6_K's zero point 32: ffnp 248 -> 233 ns a neuron at the 1.5B's
// shape, session 15).
static inline void table_add8(__m256i sums, __m256 dv, __m256 hsv, const uint16_t *ts,
                              const uint16_t *tz, __m256 zhs, int dt, int e, float *y) {
    if (!tz) {
        const __m256 g = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), dv, zhs);
        _mm256_storeu_ps(y + e, _mm256_fmadd_ps(load8(ts + e, dt), g, _mm256_loadu_ps(y + e)));
        return;
    }
    const __m256 g = _mm256_mul_ps(_mm256_cvtepi32_ps(sums), dv);
    __m256 o = _mm256_fmadd_ps(load8(ts + e, dt), g, _mm256_loadu_ps(y + e));
    _mm256_storeu_ps(y + e, _mm256_fmadd_ps(load8(tz + e, dt), hsv, o));
}
#endif

// down_batch for 4-bit columns with integer products (what llama.cpp does with its
// activations): the batch's h are quantized to int8 (h ~ D * hq, |hq| <= 127, D = max |h| / 127)
// and two columns' nibbles interleaved byte by byte, so one maddubs takes 2 neurons x 16
// elements against their (hq_k, hq_k+1) and the int16 sums of up to FLASH_INT_DOWN columns
// cannot overflow; each 64-element tile is then widened once, D * G, through the table row.
// The f32 loop decoded every nibble to a float and took an FMA per neuron per element: 3-4x
// the instructions. Columns [0, d - d % 64) only (returns where it stopped); m <= FLASH_INT_DOWN.
static int down_batch_q4i(const uint32_t *const *cols, const float *h, int m, float hs,
                          const uint16_t *ts, const uint16_t *tz, float zero, int dt, int d,
                          float *y) {
    int i = 0;
#if FLASH_VECTOR
    const float hmax = abs_max(h, m);
    if (hmax == 0.0f) return 0;  // the f32 loop adds the tz * hs term (hs is 0 then too)
    const float inv = 127.0f / hmax;
    const int pairs = (m + 1) / 2;
    __m256i cf[FLASH_INT_DOWN / 2];
    const uint8_t *cp[FLASH_INT_DOWN];
    for (int pr = 0; pr < pairs; pr++) {
        const int a = (int)lrintf(h[2 * pr] * inv);
        const int b = 2 * pr + 1 < m ? (int)lrintf(h[2 * pr + 1] * inv) : 0;
        cf[pr] = _mm256_set1_epi16((int16_t)((a & 0xff) | (b << 8)));
        cp[2 * pr] = (const uint8_t *)cols[2 * pr];
        cp[2 * pr + 1] = (const uint8_t *)cols[2 * pr + 1 < m ? 2 * pr + 1 : 2 * pr];
    }
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    const __m256 dv = _mm256_set1_ps(hmax / 127.0f), hsv = _mm256_set1_ps(hs),
                 zhs = _mm256_set1_ps(-zero * hs);
    for (; i + 64 <= d; i += 64) {
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        for (int pr = 0; pr < pairs; pr++) {
            _mm_prefetch((const char *)cp[2 * pr] + i / 2 + 128, _MM_HINT_T0);  // 4 tiles on
            _mm_prefetch((const char *)cp[2 * pr + 1] + i / 2 + 128, _MM_HINT_T0);
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)(cp[2 * pr] + i / 2));
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(cp[2 * pr + 1] + i / 2));
            const __m256i l0 = _mm256_and_si256(v0, m4), l1 = _mm256_and_si256(v1, m4);
            const __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), m4);
            const __m256i h1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m4);
            // per 128-bit lane: a0 even elements of bytes 0-7, a1 of bytes 8-15, a2 / a3 odd
            a0 = _mm256_add_epi16(a0, _mm256_maddubs_epi16(_mm256_unpacklo_epi8(l0, l1), cf[pr]));
            a1 = _mm256_add_epi16(a1, _mm256_maddubs_epi16(_mm256_unpackhi_epi8(l0, l1), cf[pr]));
            a2 = _mm256_add_epi16(a2, _mm256_maddubs_epi16(_mm256_unpacklo_epi8(h0, h1), cf[pr]));
            a3 = _mm256_add_epi16(a3, _mm256_maddubs_epi16(_mm256_unpackhi_epi8(h0, h1), cf[pr]));
        }
        // natural order: lane 0 of nat[r] is elements i + 8r .. + 8, lane 1 i + 32 + 8r .. + 8
        const __m256i nat[4] = {_mm256_unpacklo_epi16(a0, a2), _mm256_unpackhi_epi16(a0, a2),
                                _mm256_unpacklo_epi16(a1, a3), _mm256_unpackhi_epi16(a1, a3)};
        for (int r = 0; r < 8; r++) {
            const __m128i part = r < 4 ? _mm256_castsi256_si128(nat[r])
                                       : _mm256_extracti128_si256(nat[r - 4], 1);
            const int e = i + (r < 4 ? 8 * r : 32 + 8 * (r - 4));
            table_add8(_mm256_cvtepi16_epi32(part), dv, hsv, ts, tz, zhs, dt, e, y);
        }
    }
#else
    (void)cols; (void)h; (void)m; (void)hs; (void)ts; (void)tz; (void)zero; (void)dt; (void)d;
    (void)y;
#endif
    return i;
}

// down_batch for 8-bit columns with integer products: the batch's h quantized to int16 (h ~ D *
// hq, |hq| <= 32767: within 2e-5 of max |h|), two columns' bytes widened and interleaved so
// one madd takes 2 neurons x 8 elements into int32 (32 columns of 255 * 32767 * 2 fit); each
// 64-element tile is converted once, D * G, through the table row. (The f32 loop took a
// widen, a convert and an FMA per neuron per 8 elements.) Columns [0, d - d % 64); returns
// where it stopped. m <= FLASH_DOWN_BATCH.
static int down_batch_q8i(const uint32_t *const *cols, const float *h, int m, float hs,
                          const uint16_t *ts, const uint16_t *tz, float zero, int dt, int d,
                          float *y) {
    int i = 0;
#if FLASH_VECTOR
    const float hmax = abs_max(h, m);
    if (hmax == 0.0f) return 0;
    const float inv = 32767.0f / hmax;
    const int pairs = (m + 1) / 2;
    __m256i cf[FLASH_DOWN_BATCH / 2];
    const uint8_t *cp[FLASH_DOWN_BATCH];
    for (int pr = 0; pr < pairs; pr++) {
        const int a = (int)lrintf(h[2 * pr] * inv);
        const int b = 2 * pr + 1 < m ? (int)lrintf(h[2 * pr + 1] * inv) : 0;
        cf[pr] = _mm256_set1_epi32((int32_t)((uint32_t)(a & 0xffff) | ((uint32_t)b << 16)));
        cp[2 * pr] = (const uint8_t *)cols[2 * pr];
        cp[2 * pr + 1] = (const uint8_t *)cols[2 * pr + 1 < m ? 2 * pr + 1 : 2 * pr];
    }
    const __m256 dv = _mm256_set1_ps(hmax / 32767.0f), hsv = _mm256_set1_ps(hs),
                 zhs = _mm256_set1_ps(-zero * hs);
    for (; i + 64 <= d; i += 64) {
        __m256i a[8];  // a[2s] elements i + 16s + {0-3, 8-11}, a[2s + 1] + {4-7, 12-15}
        for (int r = 0; r < 8; r++) a[r] = _mm256_setzero_si256();
        for (int pr = 0; pr < pairs; pr++) {
            const uint8_t *c0 = cp[2 * pr] + i, *c1 = cp[2 * pr + 1] + i;
            _mm_prefetch((const char *)c0 + 256, _MM_HINT_T0);
            _mm_prefetch((const char *)c1 + 256, _MM_HINT_T0);
            for (int sgm = 0; sgm < 4; sgm++) {
                const __m256i v0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(c0 + 16 * sgm)));
                const __m256i v1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(c1 + 16 * sgm)));
                a[2 * sgm] = _mm256_add_epi32(a[2 * sgm],
                                              _mm256_madd_epi16(_mm256_unpacklo_epi16(v0, v1), cf[pr]));
                a[2 * sgm + 1] = _mm256_add_epi32(a[2 * sgm + 1],
                                                  _mm256_madd_epi16(_mm256_unpackhi_epi16(v0, v1), cf[pr]));
            }
        }
        for (int sgm = 0; sgm < 4; sgm++) {
            const __m256i lo = _mm256_permute2x128_si256(a[2 * sgm], a[2 * sgm + 1], 0x20);
            const __m256i hi = _mm256_permute2x128_si256(a[2 * sgm], a[2 * sgm + 1], 0x31);
            const __m256i nat[2] = {lo, hi};
            for (int u = 0; u < 2; u++) {
                const int e = i + 16 * sgm + 8 * u;
                table_add8(nat[u], dv, hsv, ts, tz, zhs, dt, e, y);
            }
        }
    }
#else
    (void)cols; (void)h; (void)m; (void)hs; (void)ts; (void)tz; (void)zero; (void)dt; (void)d;
    (void)y;
#endif
    return i;
}

// ffnp's prefetch of neuron j's input rows: gate, up (NULL for a plain FFN), their scales and
// biases. (Its down column is asked for a batch ahead instead: with it here, among these rows,
// the 4-bit down pass stalled on it - 300 vs 225 ns a neuron of the 1.5B's shape, session 11.)
static inline void prefetch_neuron(int j, const float *mask, int T, int n, const uint32_t *qg,
                                   const uint16_t *sg, const uint16_t *zg, const uint32_t *qu,
                                   const uint16_t *su, const uint16_t *zu, int words, int groups) {
    if (!maybe_needed(mask, T, n, j)) return;
    const size_t row = (size_t)j * groups, w = (size_t)j * words;
    prefetch_bytes(qg + w, (size_t)words * 4);
    prefetch_bytes(sg + row, (size_t)groups * 2);
    prefetch_bytes(zg + row, (size_t)groups * 2);
    if (qu) {
        prefetch_bytes(qu + w, (size_t)words * 4);
        prefetch_bytes(su + row, (size_t)groups * 2);
        prefetch_bytes(zu + row, (size_t)groups * 2);
    }
}

// The FFN over neurons [0, n) of a format-3 cache: gate qg / up qu (NULL: a plain FFN, qg is
// up) (capacity, d * bits / 32) uint32 with scales / biases (capacity, d / group) 16-bit dt;
// down qd (capacity, d * bits_d / 32), tab_s / tab_z (rows of d, dt; tab_z NULL: the table is
// symmetric, its biases -table_zero * tab_s, and only tab_s is read), group_of (n,) int32;
// in_bias, mask, h, partial, y, xsum and exact as in ffnq. The slots are visited a table row
// at a time - order (n,) the slots sorted by group_of, starts (segments + 1,) where each
// group's run begins - so a group's sum of h * q is scaled by its row once, not per neuron
// (the table is read once per group: a Q6_K layer's rows are 16 neurons wide). A segment goes
// in batches of up to FLASH_DOWN_BATCH neurons: their h first, then their down columns
// together (down_batch). Returns 0, or -1 without scratch.
int ffnp(const uint32_t *qg, const uint16_t *sg, const uint16_t *zg, const uint32_t *qu,
         const uint16_t *su, const uint16_t *zu, int bits, int group, const uint32_t *qd,
         int bits_d, const uint16_t *tab_s, const uint16_t *tab_z, float table_zero,
         const int32_t *group_of,
         const int32_t *order, const int32_t *starts, int segments, int dt, int64_t capacity,
         int n, int d, const float *x, int T, const float *xsum, const float *in_bias,
         const float *mask, int act, float *h, float *partial, float *y, int exact) {
    const int words = d * bits / 32, groups = d / group, words_d = d * bits_d / 32;
    const int gated = qu != NULL;
    QXBuf qb;
    const int int8 = !(exact || d % QBLOCK || group % QBLOCK || (group & (group - 1)));
    if (int8 && !qx_prepare(&qb, x, T, d, bits, group)) return -1;
    int threads = 1, failed = 0;
#pragma omp parallel
    {
        int tid = team_member(&threads);
        float first[8], second[8];
        const uint32_t *cols[FLASH_DOWN_BATCH];
        float *acc = partial + (size_t)tid * T * d;
        float *hb = (float *)malloc(sizeof(float) * (size_t)T * FLASH_DOWN_BATCH);  // (T, batch)
        memset(acc, 0, sizeof(float) * (size_t)T * d);
        if (!hb) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(dynamic, 4)
            for (int seg = 0; seg < segments; seg++) {
                const int g = group_of[order[starts[seg]]];
                const uint16_t *ts = tab_s + (size_t)g * d;
                const uint16_t *tz = tab_z ? tab_z + (size_t)g * d : NULL;
                if (seg + 1 < segments) {  // the next segment's table row (6 KiB at d 1536)
                    const int g1 = group_of[order[starts[seg + 1]]];
                    prefetch_bytes(tab_s + (size_t)g1 * d, (size_t)d * 2);
                    if (tab_z) prefetch_bytes(tab_z + (size_t)g1 * d, (size_t)d * 2);
                }
                for (int k0 = starts[seg]; k0 < starts[seg + 1]; k0 += FLASH_DOWN_BATCH) {
                    const int k1 = k0 + FLASH_DOWN_BATCH < starts[seg + 1]
                                       ? k0 + FLASH_DOWN_BATCH : starts[seg + 1];
                    int m = 0;
                    for (int k = k0; k < k1; k++) {
                        const int j = order[k];
                        if (k + FLASH_AHEAD < starts[segments])
                            prefetch_neuron(order[k + FLASH_AHEAD], mask, T, n, qg, sg, zg, qu,
                                            su, zu, words, groups);
                        if (k + FLASH_DOWN_BATCH < starts[segments]  // the next batch's column
                                && maybe_needed(mask, T, n, order[k + FLASH_DOWN_BATCH]))
                            prefetch_bytes(qd + (size_t)order[k + FLASH_DOWN_BATCH] * words_d,
                                           (size_t)words_d * 4);
                        if (!needed(mask, h, T, n, j)) continue;
                        const size_t row = (size_t)j * groups, w = (size_t)j * words;
                        for (int t0 = 0; t0 < T; t0 += 8) {
                            int nt = T - t0 < 8 ? T - t0 : 8;
                            parts_dots(qg + w, sg + row, zg + row, gated ? qu + w : NULL,
                                       gated ? su + row : NULL, gated ? zu + row : NULL, dt, d,
                                       bits, group, int8 ? &qb : NULL, x, xsum, t0, nt, first,
                                       second);
                            for (int t = 0; t < nt; t++)
                                hb[(size_t)(t0 + t) * FLASH_DOWN_BATCH + m] =
                                    neuron_value(first[t], second[t], in_bias, capacity, j,
                                                 gated, mask, n, t0 + t, act, h);
                        }
                        cols[m++] = qd + (size_t)j * words_d;
                    }
                    for (int t = 0; t < T && m; t++) {
                        const float *ht = hb + (size_t)t * FLASH_DOWN_BATCH;
                        float hs = 0.0f;
                        int any = 0;
                        for (int k = 0; k < m; k++) {
                            hs += ht[k];
                            any |= ht[k] != 0.0f;
                        }
                        if (!any) continue;
                        float *yt = acc + (size_t)t * d;
                        if (bits_d == 4 && int8) {  // integer products, FLASH_INT_DOWN at a time
                            for (int k = 0; k < m; k += FLASH_INT_DOWN) {
                                const int mk = m - k < FLASH_INT_DOWN ? m - k : FLASH_INT_DOWN;
                                float hk = 0.0f;
                                for (int u = 0; u < mk; u++) hk += ht[k + u];
                                int done = down_batch_q4i(cols + k, ht + k, mk, hk, ts, tz,
                                                          table_zero, dt, d, yt);
                                down_batch(cols + k, ht + k, mk, hk, bits_d, ts, tz, table_zero,
                                           dt, d, yt, done);
                            }
                        } else if (bits_d == 8 && int8) {
                            int done = down_batch_q8i(cols, ht, m, hs, ts, tz, table_zero, dt,
                                                      d, yt);
                            down_batch(cols, ht, m, hs, bits_d, ts, tz, table_zero, dt, d, yt,
                                       done);
                        } else {
                            down_batch(cols, ht, m, hs, bits_d, ts, tz, table_zero, dt, d, yt,
                                       0);
                        }
                    }
                }
            }
            sum_partials(partial, threads, (size_t)T * d, y);  // after the loop's barrier
        }
        free(hb);
    }
    if (int8) free(qb.mem);
    return failed ? -1 : 0;
}

// Which int8 dot products this build has: 0 scalar, 1 AVX2 (maddubs), 2 VNNI (dpbusd, 256
// bits), 3 AVX-512 VNNI (512 bits where a row allows).
int flash_int_dot_path(void) {
#if FLASH_VECTOR
    return FLASH_512 ? 3 : FLASH_VNNI ? 2 : 1;
#else
    return 0;
#endif
}

// ---- The transformer block's small ops at decode (accel/blocks.py, one position) ----
//
// numpy took ~25 calls a layer for RMSNorm, RoPE, the KV cache write and the attention of one
// token, each a few microseconds (more once the FFN's weights have streamed through the
// caches): ~10% of the 0.5B's decode step (issue 20, session 14). These do the same f32 math
// in one call each.

#if FLASH_VECTOR
// exp of 8 floats (Cephes' expf polynomial after range reduction, ~1 ulp; inputs below -87.3
// give ~0, as the scalar expf underflows there too).
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.37f)), _mm256_set1_ps(-87.33f));
    const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx),
                                                         _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

static inline float dot_f32(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.0f;
#if FLASH_VECTOR
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
    s = hsum8(_mm256_add_ps(a0, a1));
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

// p[0:n] = exp(p - max p) / their sum, in place.
static void softmax_f32(float *p, int n) {
    float m = -INFINITY, sum = 0.0f;
    for (int i = 0; i < n; i++) m = p[i] > m ? p[i] : m;
    int i = 0;
#if FLASH_VECTOR
    const __m256 mv = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + i), mv));
        _mm256_storeu_ps(p + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum8(acc);
#endif
    for (; i < n; i++) {
        p[i] = expf(p[i] - m);
        sum += p[i];
    }
    const float inv = 1.0f / sum;
    for (i = 0; i < n; i++) p[i] *= inv;
}

// out (T, d) = x * (mean(x^2) + eps)^-1/2 * w, row by row (mlx's rms_norm, as numpy did it).
void rms_norm_f32(const float *x, const float *w, float eps, int T, int d, float *out) {
    for (int t = 0; t < T; t++) {
        const float *xt = x + (size_t)t * d;
        float *ot = out + (size_t)t * d;
        const float r = 1.0f / sqrtf(dot_f32(xt, xt, d) * (1.0f / (float)d) + eps);
        for (int i = 0; i < d; i++) ot[i] = xt[i] * r * w[i];
    }
}

// One head's RoPE in place: pairs (i, i + rot / 2), or (2i, 2i + 1) when traditional, for i <
// rot / 2 rotated by (cos[i], sin[i]); dims past rot pass through.
static inline void rotate_head(float *x, int rot, int traditional, const float *cos,
                               const float *sin) {
    const int half = rot / 2;
    for (int i = 0; i < half; i++) {
        float *pa = traditional ? x + 2 * i : x + i, *pb = traditional ? x + 2 * i + 1 : x + half + i;
        const float a = *pa, b = *pb;
        *pa = a * cos[i] - b * sin[i];
        *pb = a * sin[i] + b * cos[i];
    }
}

// One decode position's attention (batch 1): qkv (heads + 2 kv_heads) * D f32 its q | k | v
// projections (q and k rotated here by cos / sin (rot / 2), the rotation at the position); the
// new k and v are written at position `offset` of kc / vc (kv_heads, cap, D) f32, and out
// (heads * D) = softmax(q . k * scale) . v over the offset + 1 positions, per head (query head
// h reads kv head h / (heads / kv_heads)). Returns 0, or -1 without scratch.
int decode_attention(float *qkv, int heads, int kv_heads, int D, int rot, int traditional,
                     const float *cos, const float *sin, float *kc, float *vc, int64_t cap,
                     int offset, float scale, float *out) {
    const int span = offset + 1, group = heads / kv_heads;
    float *q = qkv, *k = qkv + (size_t)heads * D, *v = k + (size_t)kv_heads * D;
    float *p = (float *)malloc(sizeof(float) * (size_t)span);
    if (!p) return -1;
    for (int h = 0; h < heads + kv_heads; h++) rotate_head(qkv + (size_t)h * D, rot, traditional, cos, sin);
    for (int h = 0; h < kv_heads; h++) {
        memcpy(kc + ((size_t)h * cap + offset) * D, k + (size_t)h * D, sizeof(float) * (size_t)D);
        memcpy(vc + ((size_t)h * cap + offset) * D, v + (size_t)h * D, sizeof(float) * (size_t)D);
    }
    for (int h = 0; h < heads; h++) {
        const float *qh = q + (size_t)h * D;
        const float *kh = kc + (size_t)(h / group) * cap * D, *vh = vc + (size_t)(h / group) * cap * D;
        for (int s = 0; s < span; s++) p[s] = dot_f32(qh, kh + (size_t)s * D, D) * scale;
        softmax_f32(p, span);
        float *o = out + (size_t)h * D;
        memset(o, 0, sizeof(float) * (size_t)D);
        for (int s = 0; s < span; s++) {
            const float *vs = vh + (size_t)s * D;
            const float ps = p[s];
            for (int i = 0; i < D; i++) o[i] += ps * vs[i];
        }
    }
    free(p);
    return 0;
}
