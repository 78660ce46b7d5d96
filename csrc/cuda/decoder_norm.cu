// Fused decoder-norm step, one block per row held in registers: project the gradient off the row, Adam as
// torch.optim.Adam, renormalise — one read and one write of W, exp_avg, exp_avg_sq, one read of grad.
// IEEE sqrt and division (as torch); zero rows as dlmscope/reference.py by per-row selects.
#include "common.cuh"

namespace {

template <typename T, int CPT>
__global__ void __launch_bounds__(1024) decoder_norm_kernel(T* __restrict__ W, const T* __restrict__ grad, T* __restrict__ exp_avg,
                                    T* __restrict__ exp_avg_sq, int64_t d, float one_m_b1, float beta2,
                                    float one_m_b2, float step_size, float sqrt_bc2, float eps) {
  __shared__ float scratch[32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * d;
  const int tid = threadIdx.x, nt = blockDim.x;
  float w[CPT], g[CPT], m[CPT], v[CPT];
  float ww = 0.f, gw = 0.f;
#pragma unroll
  for (int q = 0; q < CPT; ++q) {
    const int64_t col = tid + static_cast<int64_t>(q) * nt;
    const bool in = col < d;
    w[q] = in ? dlm::to_f32(W[base + col]) : 0.f;
    g[q] = in ? dlm::to_f32(grad[base + col]) : 0.f;
    m[q] = in ? dlm::to_f32(exp_avg[base + col]) : 0.f;
    v[q] = in ? dlm::to_f32(exp_avg_sq[base + col]) : 0.f;
    ww += w[q] * w[q];
    gw += g[q] * w[q];
  }
  ww = dlm::block_sum(ww, scratch);
  gw = dlm::block_sum(gw, scratch);
  // <g, w_hat> w_hat = (<g, w> / |w|^2) w, one division (a reciprocal of a subnormal |w|^2 overflows); 0 for a zero row
  const float proj = ww > 0.f ? __fdiv_rn(gw, ww) : 0.f;
  float nn = 0.f;
#pragma unroll
  for (int q = 0; q < CPT; ++q) {
    const float gq = g[q] - proj * w[q];
    m[q] = m[q] + one_m_b1 * (gq - m[q]);                 // torch: exp_avg.lerp_(g, 1 - beta1)
    v[q] = v[q] * beta2 + one_m_b2 * gq * gq;              // torch: exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2)
    const float denom = __fdiv_rn(__fsqrt_rn(v[q]), sqrt_bc2) + eps;
    w[q] = w[q] - step_size * __fdiv_rn(m[q], denom);
    const int64_t col = tid + static_cast<int64_t>(q) * nt;
    if (col < d) nn += w[q] * w[q];
  }
  nn = dlm::block_sum(nn, scratch);
  const float nrm = nn > 0.f ? __fsqrt_rn(nn) : 1.f;      // a row that is zero after the step stays zero
#pragma unroll
  for (int q = 0; q < CPT; ++q) {
    const int64_t col = tid + static_cast<int64_t>(q) * nt;
    if (col >= d) continue;
    exp_avg[base + col] = dlm::from_f32<T>(m[q]);
    exp_avg_sq[base + col] = dlm::from_f32<T>(v[q]);
    W[base + col] = dlm::from_f32<T>(__fdiv_rn(w[q], nrm));
  }
}

// the kernel instantiated for the smallest CPT (columns per thread) that covers d
template <typename T>
void launch_norm(int64_t cpt, unsigned blocks, int threads, cudaStream_t s, T* w, const T* g, T* m, T* v, int64_t d,
                 float one_m_b1, float beta2, float one_m_b2, float step_size, float sqrt_bc2, float eps) {
  auto kernel = cpt <= 1 ? decoder_norm_kernel<T, 1> : cpt <= 2 ? decoder_norm_kernel<T, 2>
              : cpt <= 4 ? decoder_norm_kernel<T, 4> : cpt <= 8 ? decoder_norm_kernel<T, 8>
              : decoder_norm_kernel<T, 16>;
  kernel<<<blocks, threads, 0, s>>>(w, g, m, v, d, one_m_b1, beta2, one_m_b2, step_size, sqrt_bc2, eps);
}

}  // namespace

extern "C" int dlm_decoder_norm_step(void* W, const void* grad, void* exp_avg, void* exp_avg_sq, int dtype,
                                     int64_t n, int64_t d, float one_m_b1, float beta2, float one_m_b2,
                                     float step_size, float sqrt_bc2, float eps, void* stream) {
  if (n == 0 || d == 0) return 0;
  const int threads = dlm::row_threads(d, 4);
  const int64_t cpt = dlm::cdiv(d, threads);
  if (cpt > 16) return static_cast<int>(cudaErrorInvalidValue);  // d > 16384
  cudaStream_t s = dlm::as_stream(stream);
  const unsigned blocks = static_cast<unsigned>(n);
  DLM_DISPATCH(dtype, T,
               launch_norm<T>(cpt, blocks, threads, s, static_cast<T*>(W), static_cast<const T*>(grad),
                              static_cast<T*>(exp_avg), static_cast<T*>(exp_avg_sq), d, one_m_b1, beta2, one_m_b2,
                              step_size, sqrt_bc2, eps));
  return dlm::last_error();
}
