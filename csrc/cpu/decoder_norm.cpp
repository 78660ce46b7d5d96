// Fused decoder update on CPU: per row (parallel over rows, the row stays in L1 between the passes)
//   1. ww = <w,w>, gw = <grad,w>                      -> g = grad - (gw / ww) w   (grad off the unit direction)
//   2. Adam as torch.optim.Adam (no weight decay, no amsgrad): m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
//      w -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps); accumulate <w,w> of the updated row
//   3. w /= ||w||
// Zero rows (dlmscope/reference.py): a row with ww == 0 has no direction, so its gradient is used unprojected
// (proj = 0); a row whose updated <w,w> is 0 is left as it is (exactly zero) -- per-row selects, no extra pass.
// grad is read only; W, exp_avg, exp_avg_sq are updated in place.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace dlmscope {
namespace cpu {
namespace {

// Pass 2 of one row (g' = g - proj w, Adam moments, parameter step) returning <w', w'>; the generic version is
// plain C++, the AVX-512 ones exist because GCC keeps std::sqrt scalar under -fmath-errno (5x slower).
template <typename T>
inline T adam_row(T* __restrict w, const T* __restrict g, T* __restrict m, T* __restrict v, int64_t d, T proj, T b1,
                  T omb1, T b2, T omb2, T bc2_sqrt, T ep, T step_size) {
  T nn = T(0);
  for (int64_t t = 0; t < d; ++t) {
    const T gp = g[t] - proj * w[t];
    const T mt = b1 * m[t] + omb1 * gp;
    const T vt = b2 * v[t] + omb2 * gp * gp;
    m[t] = mt;
    v[t] = vt;
    const T denom = std::sqrt(vt) / bc2_sqrt + ep;
    const T wt = w[t] - step_size * (mt / denom);
    w[t] = wt;
    nn += wt * wt;
  }
  return nn;
}

#if defined(__AVX512F__)
template <>
inline float adam_row<float>(float* __restrict w, const float* __restrict g, float* __restrict m,
                             float* __restrict v, int64_t d, float proj, float b1, float omb1, float b2, float omb2,
                             float bc2_sqrt, float ep, float step_size) {
  const __m512 vproj = _mm512_set1_ps(proj), vb1 = _mm512_set1_ps(b1), vomb1 = _mm512_set1_ps(omb1),
               vb2 = _mm512_set1_ps(b2), vomb2 = _mm512_set1_ps(omb2), vbc = _mm512_set1_ps(bc2_sqrt),
               vep = _mm512_set1_ps(ep), vss = _mm512_set1_ps(step_size);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t t = 0; t < d; t += 16) {
    const __mmask16 mk = d - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (d - t)) - 1u);
    const __m512 wv = _mm512_maskz_loadu_ps(mk, w + t);
    const __m512 gv = _mm512_maskz_loadu_ps(mk, g + t);
    const __m512 gp = _mm512_fnmadd_ps(vproj, wv, gv);
    const __m512 mt = _mm512_fmadd_ps(vb1, _mm512_maskz_loadu_ps(mk, m + t), _mm512_mul_ps(vomb1, gp));
    const __m512 vt = _mm512_fmadd_ps(vb2, _mm512_maskz_loadu_ps(mk, v + t), _mm512_mul_ps(_mm512_mul_ps(vomb2, gp), gp));
    _mm512_mask_storeu_ps(m + t, mk, mt);
    _mm512_mask_storeu_ps(v + t, mk, vt);
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vt), vbc), vep);
    const __m512 wt = _mm512_fnmadd_ps(vss, _mm512_div_ps(mt, denom), wv);
    _mm512_mask_storeu_ps(w + t, mk, wt);
    acc = _mm512_mask3_fmadd_ps(wt, wt, acc, mk);
  }
  return _mm512_reduce_add_ps(acc);
}

template <>
inline double adam_row<double>(double* __restrict w, const double* __restrict g, double* __restrict m,
                               double* __restrict v, int64_t d, double proj, double b1, double omb1, double b2,
                               double omb2, double bc2_sqrt, double ep, double step_size) {
  const __m512d vproj = _mm512_set1_pd(proj), vb1 = _mm512_set1_pd(b1), vomb1 = _mm512_set1_pd(omb1),
                vb2 = _mm512_set1_pd(b2), vomb2 = _mm512_set1_pd(omb2), vbc = _mm512_set1_pd(bc2_sqrt),
                vep = _mm512_set1_pd(ep), vss = _mm512_set1_pd(step_size);
  __m512d acc = _mm512_setzero_pd();
  for (int64_t t = 0; t < d; t += 8) {
    const __mmask8 mk = d - t >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << (d - t)) - 1u);
    const __m512d wv = _mm512_maskz_loadu_pd(mk, w + t);
    const __m512d gv = _mm512_maskz_loadu_pd(mk, g + t);
    const __m512d gp = _mm512_fnmadd_pd(vproj, wv, gv);
    const __m512d mt = _mm512_fmadd_pd(vb1, _mm512_maskz_loadu_pd(mk, m + t), _mm512_mul_pd(vomb1, gp));
    const __m512d vt =
        _mm512_fmadd_pd(vb2, _mm512_maskz_loadu_pd(mk, v + t), _mm512_mul_pd(_mm512_mul_pd(vomb2, gp), gp));
    _mm512_mask_storeu_pd(m + t, mk, mt);
    _mm512_mask_storeu_pd(v + t, mk, vt);
    const __m512d denom = _mm512_add_pd(_mm512_div_pd(_mm512_sqrt_pd(vt), vbc), vep);
    const __m512d wt = _mm512_fnmadd_pd(vss, _mm512_div_pd(mt, denom), wv);
    _mm512_mask_storeu_pd(w + t, mk, wt);
    acc = _mm512_mask3_fmadd_pd(wt, wt, acc, mk);
  }
  return _mm512_reduce_add_pd(acc);
}
#endif

template <typename T>
void decoder_norm_step_impl(T* W, const T* G, T* M, T* V, int64_t n, int64_t d, int64_t step, double lr,
                            double beta1, double beta2, double eps) {
  const double bc1 = 1.0 - std::pow(beta1, (double)step);
  const double bc2 = 1.0 - std::pow(beta2, (double)step);
  const T step_size = T(lr / bc1);
  const T bc2_sqrt = T(std::sqrt(bc2));
  const T b1 = T(beta1), omb1 = T(1.0 - beta1), b2 = T(beta2), omb2 = T(1.0 - beta2), ep = T(eps);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* __restrict w = W + i * d;
      const T* __restrict g = G + i * d;
      T* __restrict m = M + i * d;
      T* __restrict v = V + i * d;
      T ww = T(0), gw = T(0);
#pragma omp simd reduction(+ : ww, gw)
      for (int64_t t = 0; t < d; ++t) {
        ww += w[t] * w[t];
        gw += g[t] * w[t];
      }
      const T proj = ww > T(0) ? gw / ww : T(0);  // zero row: nothing to project off
      const T nn = adam_row<T>(w, g, m, v, d, proj, b1, omb1, b2, omb2, bc2_sqrt, ep, step_size);
      const T inv = nn > T(0) ? T(1) / std::sqrt(nn) : T(1);  // a row still zero stays zero
#pragma omp simd
      for (int64_t t = 0; t < d; ++t) w[t] *= inv;
    }
  });
}

}  // namespace

void decoder_norm_step(at::Tensor& W, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                       int64_t step, double lr, double beta1, double beta2, double eps) {
  TORCH_CHECK(W.dim() == 2 && grad.sizes() == W.sizes() && exp_avg.sizes() == W.sizes() &&
                  exp_avg_sq.sizes() == W.sizes(),
              "decoder_norm_step: W, grad, exp_avg, exp_avg_sq must all be [n,d]");
  TORCH_CHECK(grad.scalar_type() == W.scalar_type() && exp_avg.scalar_type() == W.scalar_type() &&
                  exp_avg_sq.scalar_type() == W.scalar_type(),
              "decoder_norm_step: dtype mismatch");
  TORCH_CHECK(W.is_contiguous() && grad.is_contiguous() && exp_avg.is_contiguous() && exp_avg_sq.is_contiguous(),
              "decoder_norm_step: inputs must be contiguous");
  TORCH_CHECK(step >= 1, "decoder_norm_step: step counts from 1");
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "dlmscope_decoder_norm_step", [&] {
    decoder_norm_step_impl<scalar_t>(W.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), exp_avg.data_ptr<scalar_t>(),
                                     exp_avg_sq.data_ptr<scalar_t>(), W.size(0), W.size(1), step, lr, beta1, beta2,
                                     eps);
  });
}

}  // namespace cpu
}  // namespace dlmscope
