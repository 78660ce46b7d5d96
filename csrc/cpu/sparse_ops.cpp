// Sparse primitives of the SAE step on CPU: gather-accumulate, transpose-reduce (+ fused SDDMM), SDDMM.
//
// gather_accumulate: parallel over rows b; the output row (d values) stays in L1 while the k rows W[idx[b,j]] are
//   streamed in, four at a time.
// transpose_reduce: deterministic stable counting sort of the B*k ids by latent (per-thread histograms over
//   contiguous chunks), then parallel over latents with a cost-balanced split (cost of a latent = its number of
//   entries + 1 for writing its row). Each output row is accumulated in place and written exactly once (zeros for
//   unused latents). With W, the same loop over X[b] also produces sddmm[b,j] = <X[b], W[i]> (X[b] loaded once).
// sddmm: parallel over rows b, one dot product per (b,j).
// Every id is checked against [0, n) where it is first read (one unsigned compare per id, before any row it names
// is touched): the Python value checks can be off, and an id out of range would read or write outside W / out.
#include "common.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace dlmscope {
namespace cpu {
namespace {

// Software prefetch of a whole row (random rows of X / W are not caught by the hardware prefetcher).
template <typename T>
inline void prefetch_row(const T* p, int64_t d) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = d * (int64_t)sizeof(T);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

constexpr int64_t kPrefetchDist = 4;  // entries ahead

// Cold path of the id checks: raises naming the first id of ix[0..count) outside [0, n).
[[noreturn]] __attribute__((noinline, cold)) void throw_bad_id(const int64_t* ix, int64_t count, int64_t n,
                                                                const char* op) {
  int64_t bad = 0;
  for (int64_t j = 0; j < count; ++j) {
    if (static_cast<uint64_t>(ix[j]) >= static_cast<uint64_t>(n)) {
      bad = ix[j];
      break;
    }
  }
  TORCH_CHECK(false, op, ": index ", bad, " is out of range: indices must lie in [0, n) = [0, ", n, ")");
  __builtin_unreachable();
}

// Raises unless every id of ix[0..count) lies in [0, n); an id < 0 wraps to a huge unsigned value.
inline void check_ids(const int64_t* ix, int64_t count, int64_t n, const char* op) {
  bool bad = false;
  for (int64_t j = 0; j < count; ++j) bad |= static_cast<uint64_t>(ix[j]) >= static_cast<uint64_t>(n);
  if (__builtin_expect(bad, 0)) throw_bad_id(ix, count, n, op);
}

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t d) {
  T s = T(0);
#pragma omp simd reduction(+ : s)
  for (int64_t t = 0; t < d; ++t) s += a[t] * b[t];
  return s;
}

template <typename T>
void gather_accumulate_impl(const T* coef, const int64_t* idx, const T* W, T* out, int64_t B, int64_t k,
                            int64_t d, int64_t n) {
  at::parallel_for(0, B, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      T* __restrict o = out + b * d;
      const T* c = coef + b * k;
      const int64_t* ix = idx + b * k;
      check_ids(ix, k, n, "gather_accumulate");
      int64_t j = 0;
      {
        // first group initialises the row (no separate zero pass)
        const int64_t g = std::min<int64_t>(k, 4);
        if (g == 4) {
          const T* __restrict w0 = W + ix[0] * d;
          const T* __restrict w1 = W + ix[1] * d;
          const T* __restrict w2 = W + ix[2] * d;
          const T* __restrict w3 = W + ix[3] * d;
          const T c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
#pragma omp simd
          for (int64_t t = 0; t < d; ++t) o[t] = (c0 * w0[t] + c1 * w1[t]) + (c2 * w2[t] + c3 * w3[t]);
          j = 4;
        } else if (k >= 1) {
          const T* __restrict w0 = W + ix[0] * d;
          const T c0 = c[0];
#pragma omp simd
          for (int64_t t = 0; t < d; ++t) o[t] = c0 * w0[t];
          j = 1;
        } else {
          std::fill(o, o + d, T(0));
        }
      }
      for (; j + 4 <= k; j += 4) {
        for (int64_t q = j + 4; q < std::min<int64_t>(k, j + 8); ++q) prefetch_row(W + ix[q] * d, d);
        const T* __restrict w0 = W + ix[j] * d;
        const T* __restrict w1 = W + ix[j + 1] * d;
        const T* __restrict w2 = W + ix[j + 2] * d;
        const T* __restrict w3 = W + ix[j + 3] * d;
        const T c0 = c[j], c1 = c[j + 1], c2 = c[j + 2], c3 = c[j + 3];
#pragma omp simd
        for (int64_t t = 0; t < d; ++t) o[t] += (c0 * w0[t] + c1 * w1[t]) + (c2 * w2[t] + c3 * w3[t]);
      }
      for (; j < k; ++j) {
        const T* __restrict w0 = W + ix[j] * d;
        const T c0 = c[j];
#pragma omp simd
        for (int64_t t = 0; t < d; ++t) o[t] += c0 * w0[t];
      }
    }
  });
}

template <typename T>
void sddmm_impl(const T* G, const int64_t* idx, const T* W, T* out, int64_t B, int64_t k, int64_t d, int64_t n) {
  at::parallel_for(0, B, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T* __restrict g = G + b * d;
      const int64_t* ix = idx + b * k;
      check_ids(ix, k, n, "sddmm");
      T* o = out + b * k;
      int64_t j = 0;
      for (; j + 4 <= k; j += 4) {  // four independent dot products: g loaded once, four accumulator chains
        for (int64_t q = j + 4; q < std::min<int64_t>(k, j + 8); ++q) prefetch_row(W + ix[q] * d, d);
        const T* __restrict w0 = W + ix[j] * d;
        const T* __restrict w1 = W + ix[j + 1] * d;
        const T* __restrict w2 = W + ix[j + 2] * d;
        const T* __restrict w3 = W + ix[j + 3] * d;
        T s0 = T(0), s1 = T(0), s2 = T(0), s3 = T(0);
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t t = 0; t < d; ++t) {
          s0 += g[t] * w0[t];
          s1 += g[t] * w1[t];
          s2 += g[t] * w2[t];
          s3 += g[t] * w3[t];
        }
        o[j] = s0;
        o[j + 1] = s1;
        o[j + 2] = s2;
        o[j + 3] = s3;
      }
      for (; j < k; ++j) o[j] = dot(g, W + ix[j] * d, d);
    }
  });
}

// Stable counting sort of the M = B*k entry positions by latent id.
// start[i] .. start[i+1] delimit latent i's entries in ``order`` (entry position e = b*k + j, increasing within i).
// Raises if an id lies outside [0, n): the histogram pass checks each id before counting it.
void counting_sort(const int64_t* idx, int64_t M, int64_t n, std::vector<int64_t>& start, std::vector<int64_t>& order) {
  const int64_t P = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), M / 4096 + 1));
  const int64_t chunk = (M + P - 1) / P;
  std::vector<int64_t> hist((size_t)P * n, 0);
  at::parallel_for(0, P, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t p = pb; p < pe; ++p) {
      int64_t* h = hist.data() + p * n;
      const int64_t e1 = std::min(M, (p + 1) * chunk);
      for (int64_t e = p * chunk; e < e1; ++e) {
        const uint64_t i = static_cast<uint64_t>(idx[e]);
        if (__builtin_expect(i >= static_cast<uint64_t>(n), 0)) throw_bad_id(idx + e, 1, n, "transpose_reduce");
        ++h[i];
      }
    }
  });
  start.assign(n + 1, 0);
  int64_t run = 0;
  for (int64_t i = 0; i < n; ++i) {
    start[i] = run;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t c = hist[p * n + i];
      hist[p * n + i] = run;  // becomes the write offset of chunk p for latent i
      run += c;
    }
  }
  start[n] = run;
  order.resize(M);
  at::parallel_for(0, P, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t p = pb; p < pe; ++p) {
      int64_t* off = hist.data() + p * n;
      const int64_t e1 = std::min(M, (p + 1) * chunk);
      for (int64_t e = p * chunk; e < e1; ++e) order[off[idx[e]]++] = e;
    }
  });
}

// One latent of transpose_reduce: o = sum over its entries of coef[e] * X[e / k] (o written, not accumulated into),
// returns sum of coef; if Fused also sd[e] = <X[e / k], w>. Entries are taken in pairs (two independent dot chains,
// one read-modify-write of o per pair) and the X rows a few entries ahead are prefetched.
template <typename T, bool Fused>
inline T reduce_latent(const int64_t* ent, int64_t cnt, const T* coef, const T* X, const T* __restrict w,
                       T* __restrict o, T* sd, int64_t k, int64_t d) {
  for (int64_t q = 0; q < std::min<int64_t>(cnt, kPrefetchDist); ++q) prefetch_row(X + (ent[q] / k) * d, d);
  T cs = T(0);
  int64_t s = 0;
  {
    const int64_t e = ent[s++];
    const T c = coef[e];
    const T* __restrict x = X + (e / k) * d;
    cs += c;
    if constexpr (Fused) {
      T dp = T(0);
#pragma omp simd reduction(+ : dp)
      for (int64_t t = 0; t < d; ++t) {
        o[t] = c * x[t];
        dp += x[t] * w[t];
      }
      sd[e] = dp;
    } else {
#pragma omp simd
      for (int64_t t = 0; t < d; ++t) o[t] = c * x[t];
    }
  }
  for (; s + 2 <= cnt; s += 2) {
    for (int64_t q = s + kPrefetchDist; q < std::min<int64_t>(cnt, s + kPrefetchDist + 2); ++q)
      prefetch_row(X + (ent[q] / k) * d, d);
    const int64_t e0 = ent[s], e1 = ent[s + 1];
    const T c0 = coef[e0], c1 = coef[e1];
    const T* __restrict x0 = X + (e0 / k) * d;
    const T* __restrict x1 = X + (e1 / k) * d;
    cs += c0;
    cs += c1;
    if constexpr (Fused) {
      T dp0 = T(0), dp1 = T(0);
#pragma omp simd reduction(+ : dp0, dp1)
      for (int64_t t = 0; t < d; ++t) {
        o[t] += c0 * x0[t] + c1 * x1[t];
        dp0 += x0[t] * w[t];
        dp1 += x1[t] * w[t];
      }
      sd[e0] = dp0;
      sd[e1] = dp1;
    } else {
#pragma omp simd
      for (int64_t t = 0; t < d; ++t) o[t] += c0 * x0[t] + c1 * x1[t];
    }
  }
  if (s < cnt) {
    const int64_t e = ent[s];
    const T c = coef[e];
    const T* __restrict x = X + (e / k) * d;
    cs += c;
    if constexpr (Fused) {
      T dp = T(0);
#pragma omp simd reduction(+ : dp)
      for (int64_t t = 0; t < d; ++t) {
        o[t] += c * x[t];
        dp += x[t] * w[t];
      }
      sd[e] = dp;
    } else {
#pragma omp simd
      for (int64_t t = 0; t < d; ++t) o[t] += c * x[t];
    }
  }
  return cs;
}

template <typename T>
void transpose_reduce_impl(const T* coef, const int64_t* idx, const T* X, const T* W, T* out, T* csum, T* sd,
                           int64_t B, int64_t k, int64_t d, int64_t n) {
  const int64_t M = B * k;
  std::vector<int64_t> start, order;
  counting_sort(idx, M, n, start, order);
  // Cost-balanced split of the latents: cost(i) = count(i) + 1; prefix cost(< i) = start[i] + i.
  const int64_t total = M + n;
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(n, 8 * at::get_num_threads()));
  std::vector<int64_t> bounds(nchunks + 1);
  bounds[0] = 0;
  bounds[nchunks] = n;
  for (int64_t c = 1; c < nchunks; ++c) {
    const int64_t target = total * c / nchunks;
    int64_t lo = bounds[c - 1], hi = n;  // first i with start[i] + i >= target
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (start[mid] + mid >= target) hi = mid;
      else lo = mid + 1;
    }
    bounds[c] = lo;
  }
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ++ch) {
      for (int64_t i = bounds[ch]; i < bounds[ch + 1]; ++i) {
        T* __restrict o = out + i * d;
        const int64_t s0 = start[i], s1 = start[i + 1];
        if (s0 == s1) {
          std::fill(o, o + d, T(0));
          csum[i] = T(0);
          continue;
        }
        csum[i] = W == nullptr ? reduce_latent<T, false>(order.data() + s0, s1 - s0, coef, X, nullptr, o, nullptr, k, d)
                               : reduce_latent<T, true>(order.data() + s0, s1 - s0, coef, X, W + i * d, o, sd, k, d);
      }
    }
  });
}

void check_sparse(const at::Tensor& coef, const at::Tensor& idx, const char* name) {
  TORCH_CHECK(coef.dim() == 2 && idx.dim() == 2 && coef.sizes() == idx.sizes(), name, ": coef/idx must be [B,k]");
  TORCH_CHECK(idx.scalar_type() == at::kLong, name, ": idx must be int64");
  TORCH_CHECK(coef.is_contiguous() && idx.is_contiguous(), name, ": inputs must be contiguous");
}

}  // namespace

at::Tensor gather_accumulate(const at::Tensor& coef, const at::Tensor& idx, const at::Tensor& W) {
  check_sparse(coef, idx, "gather_accumulate");
  TORCH_CHECK(W.dim() == 2 && W.is_contiguous() && W.scalar_type() == coef.scalar_type(),
              "gather_accumulate: W must be a contiguous [n,d] tensor of coef's dtype");
  const int64_t B = coef.size(0), k = coef.size(1), d = W.size(1);
  auto out = empty_output({B, d}, W.options());
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "dlmscope_gather_accumulate", [&] {
    gather_accumulate_impl<scalar_t>(coef.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), W.data_ptr<scalar_t>(),
                                     out.data_ptr<scalar_t>(), B, k, d, W.size(0));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> transpose_reduce(const at::Tensor& coef, const at::Tensor& idx,
                                                                const at::Tensor& X, int64_t n,
                                                                const std::optional<at::Tensor>& W) {
  check_sparse(coef, idx, "transpose_reduce");
  TORCH_CHECK(X.dim() == 2 && X.size(0) == coef.size(0) && X.is_contiguous() &&
                  X.scalar_type() == coef.scalar_type(),
              "transpose_reduce: X must be a contiguous [B,d] tensor of coef's dtype");
  const int64_t B = coef.size(0), k = coef.size(1), d = X.size(1);
  const bool fused = W.has_value() && W->defined();
  if (fused) {
    TORCH_CHECK(W->dim() == 2 && W->size(0) == n && W->size(1) == d && W->is_contiguous() &&
                    W->scalar_type() == X.scalar_type(),
                "transpose_reduce: W must be a contiguous [n,d] tensor of X's dtype");
  }
  auto out = empty_output({n, d}, X.options());
  auto csum = at::empty({n}, X.options());
  auto sd = fused ? at::empty({B, k}, X.options()) : at::empty({0}, X.options());
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "dlmscope_transpose_reduce", [&] {
    transpose_reduce_impl<scalar_t>(coef.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), X.data_ptr<scalar_t>(),
                                    fused ? W->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                                    csum.data_ptr<scalar_t>(), fused ? sd.data_ptr<scalar_t>() : nullptr, B, k, d,
                                    n);
  });
  return {out, csum, sd};
}

at::Tensor sddmm(const at::Tensor& G, const at::Tensor& idx, const at::Tensor& W) {
  TORCH_CHECK(G.dim() == 2 && idx.dim() == 2 && G.size(0) == idx.size(0), "sddmm: G [B,d], idx [B,k]");
  TORCH_CHECK(idx.scalar_type() == at::kLong, "sddmm: idx must be int64");
  TORCH_CHECK(W.dim() == 2 && W.size(1) == G.size(1) && W.scalar_type() == G.scalar_type(),
              "sddmm: W must be [n,d] of G's dtype");
  TORCH_CHECK(G.is_contiguous() && idx.is_contiguous() && W.is_contiguous(), "sddmm: inputs must be contiguous");
  const int64_t B = G.size(0), k = idx.size(1), d = G.size(1);
  auto out = at::empty({B, k}, G.options());
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "dlmscope_sddmm", [&] {
    sddmm_impl<scalar_t>(G.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), W.data_ptr<scalar_t>(),
                         out.data_ptr<scalar_t>(), B, k, d, W.size(0));
  });
  return out;
}

}  // namespace cpu
}  // namespace dlmscope
