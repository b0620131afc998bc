// CPU kernels for mlx-flash's fast CPU path (mlx_flash/accel/build.py builds this file on first
// use; mlx_flash/accel/kernels.py binds it).
//
// Weights stay in their 16-bit storage type (f16 or bf16, passed as uint16) and are widened to
// f32 in registers, so a decode step streams half the bytes of an f32 copy and the neuron cache
// holds rows exactly as they are on flash. Activations and accumulation are f32.
//
// Entry points:
//   linear16  y[t, r] = W[r, :] . x[t, :] (+ b[r])                 (attention, lm_head)
//   linear_q  the same over MLX affine-quantized rows (4 or 8 bits): w = scale * q + bias
//   ffn16     y[t, :] = sum_j h[t, j] * down[j, :],  h = act(gate . x) * (up . x) * mask
//             over the first n neurons of the cache (part-major buffer, or raw bundles)
//
// Both split rows/neurons across OpenMP threads; without OpenMP they run on one thread.
// x86 with F16C/AVX2/FMA takes the vector path; anything else the portable scalar one.

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
enum { ACT_SILU = 0, ACT_GELU = 1, ACT_GELU_APPROX = 2, ACT_RELU = 3, ACT_RELU2 = 4 };

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
    default: return v > 0.0f ? v * v : 0.0f;  // ACT_RELU2
    }
}

// Whether any token of the call needs neuron j (mask NULL: all do); if not, its h is zeroed.
static inline int needed(const float *mask, float *h, int T, int n, int j) {
    if (!mask) return 1;
    for (int t = 0; t < T; t++)
        if (mask[(size_t)t * n + j] != 0.0f) return 1;
    for (int t = 0; t < T; t++) h[(size_t)t * n + j] = 0.0f;
    return 0;
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
                    float a = first[t] + (in_bias ? in_bias[s] : 0.0f);
                    float v = activate(a, act);
                    if (gated) v *= second[t] + (in_bias ? in_bias[bias_stride + s] : 0.0f);
                    if (mask) v *= mask[(size_t)(t0 + t) * n + j];
                    h[(size_t)(t0 + t) * n + j] = v;
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

void linear_q(const uint32_t *Wq, const float *scales, const float *biases, int rows, int d,
              int bits, int group, const float *x, int T, const float *xsum, const float *b,
              float *y) {
    const int words = d * bits / 32, groups = d / group;
#pragma omp parallel for schedule(dynamic, 64)
    for (int r = 0; r < rows; r++) {
        float out[8];
        for (int t0 = 0; t0 < T; t0 += 8) {
            int nt = T - t0 < 8 ? T - t0 : 8;
            dotq_tokens(Wq + (size_t)r * words, scales + (size_t)r * groups,
                        biases + (size_t)r * groups, d, bits, group, x + (size_t)t0 * d,
                        xsum + (size_t)t0 * groups, nt, out);
            for (int t = 0; t < nt; t++)
                y[(size_t)(t0 + t) * rows + r] = out[t] + (b ? b[r] : 0.0f);
        }
    }
}

// Scales / biases of one quantized row, 16-bit storage -> f32.
#define FLASH_MAX_GROUPS 512
static inline void widen(const uint16_t *a, int n, int dt, float *out) {
    for (int i = 0; i < n; i++) out[i] = to_f32(a[i], dt);
}

// ffn16 over the quantized cache: q (P, capacity, d * bits / 32) uint32, scales / biases
// (P, capacity, d / group) 16-bit (dt), neurons [0, n); in_bias (P - 1, capacity) f32 or NULL;
// mask, h, partial and y as in ffn16; xsum (T, d / group) the group sums of x.
void ffnq(const uint32_t *q, const uint16_t *scales, const uint16_t *biases, int dt, int P,
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

