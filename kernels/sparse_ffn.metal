// mlx-flash: the fused sparse FFN over cached neuron rows - Metal bodies for mx.fast.metal_kernel.
//
// Reference semantics: mlx_flash/compute/reference.py `ffn_over_rows` over the first n buffer
// rows (neuron i is buffer row i):
//   h[t, i] = act(x[t] . gate_row + b0) * (x[t] . up_row + b1) * mask[t, i]    (P = 3, gated)
//   h[t, i] = act(x[t] . up_row + b0) * mask[t, i]                             (P = 2, plain)
//   y[t, :] = sum_i h[t, i] * down_row(i)
// w is the part-major cache buffer (P, cap, d), row-contiguous: part p of buffer row r starts at
// element (p * cap + r) * d. bias is (P - 1, cap) float32, mask is (NTOK, n) float32 (both
// converted by compute/gpu.py; dummies of one element when absent, read only under HAS_*).
//
// File format (parsed by mlx_flash/compute/gpu.py `parse_kernel_source`):
//   // @header                              helpers, passed as `header=` to every kernel below
//   // @kernel NAME(in, ...) -> (out, ...)  one kernel: name, input_names, output_names, body
//
// Twin file: kernels/sparse_ffn.cu. Same kernels, inputs, outputs, template constants, launch and
// indexing; a reviewer can diff the bodies line by line. The only lines that differ:
//   Metal (this file)                        CUDA (sparse_ffn.cu)
//   thread_position_in_threadgroup.x         threadIdx.x
//   thread_position_in_grid.y  (act)         blockIdx.y * blockDim.y + threadIdx.y
//   thread_position_in_grid.x  (down)        blockIdx.x * blockDim.x + threadIdx.x
//   thread_position_in_grid.y  (down)        blockIdx.y   (threadgroup height is 1)
//   flash_warp_sum: metal::simd_sum          flash_warp_sum: __shfl_xor_sync butterfly
//   flash_exp / flash_tanh: metal::          expf / tanhf
//   flash_erf: Abramowitz-Stegun 7.1.26      erff
//     (|error| < 1.5e-7; Metal has no erf)
//   `inline`                                 `__device__ __forceinline__`
// Template constants arrive as template parameters here and as constexpr/using in CUDA; both are
// compile-time, so `if (P == 3)` etc. fold away.
//
// Template constants: WT, XT (dtypes of w and x: f16 / bf16 / f32; every load is converted to
// float, all sums are float), P (2 or 3), NTOK (tokens T, 1..16: register accumulators), ACT
// (0 silu, 1 gelu, 2 gelu_approx, 3 relu, 4 relu2, 5 identity: format/arch.py ACTIVATION_CODES), HAS_MASK,
// HAS_BIAS.  params (int32[4]): n, d, cap, chunk.
//
// Launch (compute/gpu.py `ffn_kernel`; grid in threads, always a whole number of threadgroups, so
// Metal's dispatchThreads never makes a partial threadgroup and CUDA's rounding up is exact):
//   flash_ffn_act : grid (32, n_pad, 1), threadgroup (32, 8, 1), n_pad = 8 * ceil(n / 8).
//     One 32-lane simdgroup / warp per neuron (a threadgroup row is exactly one simdgroup since
//     the x extent is 32). Out: h (NTOK, n) float32.
//   flash_ffn_down: grid (128 * ceil(d / 128), ceil(n / chunk), 1), threadgroup (128, 1, 1).
//     One thread per (output column c, chunk g of neurons). Out: part (chunks, NTOK, d) float32,
//     summed over chunks by compute/gpu.py (split-K: enough threads when d is small).
//
// Edge cases (same in both files):
//   n == 0      never launched: compute/gpu.py returns zeros.
//   n % 8 != 0  padding neurons i >= n leave at once; the exit is uniform over the simdgroup
//               (i is the same on all 32 lanes), so the simd reduction never sees a missing lane.
//   d % 32 != 0 lanes stride k = lane, lane + 32, ... < d; short lanes add nothing.
//   d % 128     padding columns c >= d leave at once (no synchronisation in flash_ffn_down).
//   n % chunk   the last chunk stops at n.
//   masked rows a neuron whose mask is 0 for every token writes h = 0 without reading its rows;
//               flash_ffn_down skips a neuron whose h is 0 for every token (no down read). This
//               differs from the reference only when a skipped row holds inf/nan (0 * inf).

// @header
inline float flash_exp(float v) {
  return metal::exp(v);
}

inline float flash_tanh(float v) {
  return metal::tanh(v);
}

inline float flash_erf(float v) {
  // Abramowitz & Stegun 7.1.26 on |v|, odd extension; |error| < 1.5e-7.
  const float a = metal::fabs(v);
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  const float poly =
      t * (0.254829592f +
           t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const float r = 1.0f - poly * metal::exp(-a * a);
  return v < 0.0f ? -r : r;
}

inline float flash_warp_sum(float v) {
  return metal::simd_sum(v);
}

inline float flash_act(float v, int act) {
  if (act == 0) {
    return v / (1.0f + flash_exp(-v));  // silu
  }
  if (act == 1) {
    return 0.5f * v * (1.0f + flash_erf(v * 0.70710678118654752f));  // gelu
  }
  if (act == 2) {
    const float inner = 0.79788456080286536f * (v + 0.044715f * v * v * v);
    return 0.5f * v * (1.0f + flash_tanh(inner));  // gelu_approx
  }
  if (act == 5) {
    return v;  // identity: a gate-resident bundle's act(gate x) comes as the mask
  }
  const float r = v > 0.0f ? v : 0.0f;
  if (act == 3) {
    return r;  // relu
  }
  return r * r;  // relu2
}

// @kernel flash_ffn_act(x, w, mask, bias, params) -> (h)
// Phase 1: h[t, i] for one neuron i per simdgroup. Lane l dots columns l, l + 32, ... of the
// neuron's first (gate or up) and second (up, gated only) rows with every token, then the
// simdgroup sums the 32 partials.
const int n = params[0];
const int d = params[1];
const int cap = params[2];
const int lane = int(thread_position_in_threadgroup.x);
const int i = int(thread_position_in_grid.y);
if (i >= n) {
  return;  // padding neuron: all 32 lanes leave together
}
const int64_t row = int64_t(i);
bool live = true;
if (HAS_MASK) {
  live = false;
  for (int t = 0; t < NTOK; ++t) {
    live = live || (mask[t * n + i] != 0.0f);
  }
}
if (!live) {
  if (lane == 0) {
    for (int t = 0; t < NTOK; ++t) {
      h[t * n + i] = 0.0f;
    }
  }
  return;  // masked out for every token; uniform over the simdgroup (same i, same mask)
}
const int64_t first = row * d;                     // part 0: gate (P = 3) or up/fc1 (P = 2)
const int64_t second = (int64_t(cap) + row) * d;   // part 1: up, read only when P == 3
float acc0[NTOK];
float acc1[NTOK];
for (int t = 0; t < NTOK; ++t) {
  acc0[t] = 0.0f;
  acc1[t] = 0.0f;
}
for (int k = lane; k < d; k += 32) {
  const float a = static_cast<float>(w[first + k]);
  const float b = (P == 3) ? static_cast<float>(w[second + k]) : 0.0f;
  for (int t = 0; t < NTOK; ++t) {
    const float xv = static_cast<float>(x[t * d + k]);
    acc0[t] += a * xv;
    acc1[t] += b * xv;
  }
}
for (int t = 0; t < NTOK; ++t) {
  acc0[t] = flash_warp_sum(acc0[t]);
  if (P == 3) {
    acc1[t] = flash_warp_sum(acc1[t]);
  }
}
if (lane == 0) {
  for (int t = 0; t < NTOK; ++t) {
    float pre = acc0[t];
    if (HAS_BIAS) {
      pre += bias[row];
    }
    float hv = flash_act(pre, ACT);
    if (P == 3) {
      float up = acc1[t];
      if (HAS_BIAS) {
        up += bias[int64_t(cap) + row];
      }
      hv *= up;
    }
    if (HAS_MASK) {
      hv *= mask[t * n + i];
    }
    h[t * n + i] = hv;
  }
}

// @kernel flash_ffn_down(h, w, params) -> (part)
// Phase 2: part[g, t, c] = sum over neurons i of chunk g of h[t, i] * down_row(i)[c]. Threads of
// a threadgroup own consecutive columns, so each down row is read coalesced.
const int n = params[0];
const int d = params[1];
const int cap = params[2];
const int chunk = params[3];
const int c = int(thread_position_in_grid.x);
const int g = int(thread_position_in_grid.y);
if (c >= d) {
  return;  // padding column; nothing below synchronises
}
const int i0 = g * chunk;
const int i1 = (i0 + chunk < n) ? i0 + chunk : n;
const int64_t down = int64_t(P - 1) * cap;  // first buffer row of the down part
float acc[NTOK];
for (int t = 0; t < NTOK; ++t) {
  acc[t] = 0.0f;
}
for (int i = i0; i < i1; ++i) {
  float hv[NTOK];
  bool any = false;
  for (int t = 0; t < NTOK; ++t) {
    hv[t] = h[t * n + i];
    any = any || (hv[t] != 0.0f);
  }
  if (!any) {
    continue;  // masked or zero activation for every token: skip the down row
  }
  const float wv = static_cast<float>(w[(down + int64_t(i)) * d + c]);
  for (int t = 0; t < NTOK; ++t) {
    acc[t] += hv[t] * wv;
  }
}
for (int t = 0; t < NTOK; ++t) {
  part[(int64_t(g) * NTOK + t) * d + c] = acc[t];
}
