// mlx-flash: the window update of the neuron cache buffer - Metal body for mx.fast.metal_kernel.
//
// Reference semantics: mlx_flash/compute/reference.py `window_update`: first row src[j] moves
// into hole dst[j] for every part (reading the buffer as it was), then new row j is written into
// slot slots[j]. MLX custom kernels cannot write into an input, so this kernel writes the whole
// new buffer out (P, cap, d) as a gather copy. compute/gpu.py `window_update_kernel` folds
// dst/src/slots into one int32 map first:
//   code = arange(cap); code[dst] = src; code[slots] = cap + j
//   out[p, s, c] = code[s] < cap ? w[p, code[s], c] : rows[p, code[s] - cap, c]
// which is exactly the reference's order (moves read the old buffer; inserts win over moves).
// rows (P, k, d) is in w's dtype (a one-element dummy when k == 0: never read, code < cap).
//
// File format: see kernels/sparse_ffn.metal (`// @kernel NAME(in, ...) -> (out, ...)`).
// Twin file: kernels/window_update.cu, line for line; the only difference is the thread index:
//   Metal: thread_position_in_grid.x         CUDA: blockIdx.x * blockDim.x + threadIdx.x
//
// Template constants: WT (dtype of w, out and rows; copied as is, no conversion), P (parts: 3 or
// 2 for weights, 2 or 1 for the (P - 1, cap, 1) bias buffer).  params (int32[4]): cap, d, k, 0.
// Launch: grid (256 * ceil(P * cap * d / 256), 1, 1), threadgroup (256, 1, 1); one thread per
// output element e = (p * cap + s) * d + c, 64-bit offsets.
// Edge cases: m == 0 or k == 0 (code is the identity there: a plain copy); d == 1 (the bias
// buffer); P * cap * d not a multiple of 256 (padding threads leave at once).

// @kernel flash_window_update(w, code, rows, params) -> (out)
const int cap = params[0];
const int d = params[1];
const int k = params[2];
const int64_t e = int64_t(thread_position_in_grid.x);
const int64_t total = int64_t(P) * cap * d;
if (e >= total) {
  return;  // padding thread
}
const int64_t c = e % d;
const int64_t ps = e / d;  // p * cap + s
const int64_t s = ps % cap;
const int64_t p = ps / cap;
const int64_t from = int64_t(code[s]);
if (from < cap) {
  out[e] = w[(p * cap + from) * d + c];
} else {
  out[e] = rows[(p * k + (from - cap)) * d + c];
}
