// The sparse primitives: gather-accumulate (decoder forward, encoder dx), SDDMM (decoder d_values), the sort of
// the B*k ids by latent, and the transpose-reduce over that sort (dW_enc, dW_dec, db_enc) with the decoder's
// SDDMM fused in. One sort serves both transpose-reduces of a step (the backend caches it per ids tensor).
#include <cub/device/device_radix_sort.cuh>

#include "common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kGatherCols = 4;  // columns per thread of gather_accumulate (strided by the block)

template <typename T>
__global__ void __launch_bounds__(kThreads) gather_accumulate_kernel(
    const T* __restrict__ coef, const int64_t* __restrict__ idx, const T* __restrict__ W, T* __restrict__ out,
    int64_t k, int64_t d) {
  const int64_t b = blockIdx.x;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kThreads * kGatherCols + threadIdx.x;
  float acc[kGatherCols] = {};
  for (int64_t j = 0; j < k; ++j) {  // j order: deterministic sums
    const float c = dlm::to_f32(coef[b * k + j]);
    const T* w = W + idx[b * k + j] * d;
#pragma unroll
    for (int q = 0; q < kGatherCols; ++q) {
      const int64_t col = col0 + q * kThreads;
      if (col < d) acc[q] += c * dlm::to_f32(w[col]);
    }
  }
#pragma unroll
  for (int q = 0; q < kGatherCols; ++q) {
    const int64_t col = col0 + q * kThreads;
    if (col < d) out[b * d + col] = dlm::from_f32<T>(acc[q]);
  }
}

// one block per row of G, one warp per (row, j): lanes stride over d, then a warp reduction
template <typename T>
__global__ void __launch_bounds__(kThreads) sddmm_kernel(const T* __restrict__ G, const int64_t* __restrict__ idx,
                                                         const T* __restrict__ W, T* __restrict__ out, int64_t k,
                                                         int64_t d) {
  const int64_t b = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* g = G + b * d;
  for (int64_t j = warp; j < k; j += kThreads / 32) {
    const T* w = W + idx[b * k + j] * d;
    float s = 0.f;
    for (int64_t col = lane; col < d; col += 32) s += dlm::to_f32(g[col]) * dlm::to_f32(w[col]);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) out[b * k + j] = dlm::from_f32<T>(s);
  }
}

__global__ void iota_kernel(int64_t* out, int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) out[i] = i;
}

// starts[i] = first sorted position with id >= i, for i in [0, n]
__global__ void segment_starts_kernel(const int64_t* __restrict__ sorted_ids, int64_t count, int64_t n,
                                      int64_t* __restrict__ starts) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i > n) return;
  int64_t lo = 0, hi = count;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (sorted_ids[mid] < i) lo = mid + 1; else hi = mid;
  }
  starts[i] = lo;
}

int id_bits(int64_t n) {
  int bits = 1;
  while (bits < 63 && (int64_t{1} << bits) < n) ++bits;
  return bits;
}

// ---- transpose-reduce ----------------------------------------------------------------------------------------
// Pass 1: block c reduces the sorted entries [c * chunk, (c + 1) * chunk) run by run (a run = one latent's
// entries inside the chunk), threads over d with CPT columns each in registers. A run wholly inside the chunk is
// written to out; a run that began in an earlier chunk goes to head[c], one that continues past the chunk to
// tail[c]. Pass 2 writes each latent spanning chunks c0..c1 as tail[c0] + head[c0 + 1] + ... + head[c1], and
// zeros for empty latents. Every block does `chunk` entries however the ids are distributed: a latent that fires
// on most rows no longer serialises on one block.
template <typename T, int CPT, bool SDDMM>
__global__ void __launch_bounds__(1024) transpose_reduce_chunks_kernel(
    const T* __restrict__ coef, const int64_t* __restrict__ sorted_ids, const int64_t* __restrict__ perm,
    const T* __restrict__ X, const T* __restrict__ W, T* __restrict__ out, T* __restrict__ coef_sum,
    T* __restrict__ sddmm, float* __restrict__ head, float* __restrict__ tail, float* __restrict__ head_csum,
    float* __restrict__ tail_csum, int64_t count, int64_t k, int64_t d, int64_t chunk) {
  __shared__ float red[32][33];  // SDDMM partial dots: [warp][pending entry]
  __shared__ int64_t red_pos[32];
  const int tid = threadIdx.x, nt = blockDim.x, warp = tid >> 5, lane = tid & 31, warps = nt >> 5;
  const int64_t c = blockIdx.x;
  const int64_t start = c * chunk, end = min(start + chunk, count);

  float acc[CPT], w[CPT];
  float csum = 0.f;
  int64_t cur = sorted_ids[start];
  bool began_before = start > 0 && sorted_ids[start - 1] == cur;
  auto load_w = [&](int64_t lat) {
#pragma unroll
    for (int q = 0; q < CPT; ++q) {
      const int64_t col = tid + static_cast<int64_t>(q) * nt;
      w[q] = (SDDMM && col < d) ? dlm::to_f32(W[lat * d + col]) : 0.f;
    }
  };
  auto flush = [&](int64_t lat, bool from_before, bool continues) {
    float* dst = from_before ? head + c * d : (continues ? tail + c * d : nullptr);
#pragma unroll
    for (int q = 0; q < CPT; ++q) {
      const int64_t col = tid + static_cast<int64_t>(q) * nt;
      if (col >= d) continue;
      if (dst != nullptr) dst[col] = acc[q];
      else out[lat * d + col] = dlm::from_f32<T>(acc[q]);
    }
    if (tid == 0) {
      if (from_before) head_csum[c] = csum;
      else if (continues) tail_csum[c] = csum;
      else coef_sum[lat] = dlm::from_f32<T>(csum);
    }
  };
#pragma unroll
  for (int q = 0; q < CPT; ++q) acc[q] = 0.f;
  if (SDDMM) load_w(cur);

  int pending = 0;
  for (int64_t p = start; p < end; ++p) {
    const int64_t lat = sorted_ids[p];
    if (lat != cur) {
      flush(cur, began_before, false);
      cur = lat;
      began_before = false;
      csum = 0.f;
#pragma unroll
      for (int q = 0; q < CPT; ++q) acc[q] = 0.f;
      if (SDDMM) load_w(cur);
    }
    const int64_t pos = perm[p];
    const float cf = dlm::to_f32(coef[pos]);
    const T* x = X + (pos / k) * d;
    float dot = 0.f;
#pragma unroll
    for (int q = 0; q < CPT; ++q) {
      const int64_t col = tid + static_cast<int64_t>(q) * nt;
      if (col < d) {
        const float xv = dlm::to_f32(x[col]);
        acc[q] += cf * xv;
        if (SDDMM) dot += xv * w[q];
      }
    }
    csum += cf;
    if (SDDMM) {
      for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      if (lane == 0) red[warp][pending] = dot;
      if (tid == 0) red_pos[pending] = pos;
      if (++pending == 32 || p == end - 1) {  // uniform across the block
        __syncthreads();
        if (tid < pending) {
          float s = 0.f;
          for (int v = 0; v < warps; ++v) s += red[v][tid];
          sddmm[red_pos[tid]] = dlm::from_f32<T>(s);
        }
        __syncthreads();
        pending = 0;
      }
    }
  }
  flush(cur, began_before, end < count && sorted_ids[end] == cur);
}

template <typename T>
__global__ void transpose_reduce_fixup_kernel(const int64_t* __restrict__ starts, const float* __restrict__ head,
                                              const float* __restrict__ tail, const float* __restrict__ head_csum,
                                              const float* __restrict__ tail_csum, T* __restrict__ out,
                                              T* __restrict__ coef_sum, int64_t d, int64_t chunk) {
  const int64_t i = blockIdx.x;
  const int64_t s = starts[i], e = starts[i + 1];
  if (e > s && s / chunk == (e - 1) / chunk) return;  // inside one chunk: pass 1 wrote it
  const int64_t c0 = s / chunk, c1 = e > s ? (e - 1) / chunk : c0 - 1;  // empty: no chunk, zeros
  for (int64_t col = threadIdx.x; col < d; col += blockDim.x) {
    float acc = e > s ? tail[c0 * d + col] : 0.f;
    for (int64_t c = c0 + 1; c <= c1; ++c) acc += head[c * d + col];
    out[i * d + col] = dlm::from_f32<T>(acc);
  }
  if (threadIdx.x == 0) {
    float acc = e > s ? tail_csum[c0] : 0.f;
    for (int64_t c = c0 + 1; c <= c1; ++c) acc += head_csum[c];
    coef_sum[i] = dlm::from_f32<T>(acc);
  }
}

// pass 1 instantiated for the smallest CPT (columns per thread) that covers d, with or without the SDDMM
template <typename T, bool SDDMM>
using ChunksKernel = void (*)(const T*, const int64_t*, const int64_t*, const T*, const T*, T*, T*, T*, float*,
                              float*, float*, float*, int64_t, int64_t, int64_t, int64_t);

template <typename T, bool SDDMM>
ChunksKernel<T, SDDMM> chunks_kernel_for(int64_t cpt) {
  return cpt <= 1 ? transpose_reduce_chunks_kernel<T, 1, SDDMM> : cpt <= 2 ? transpose_reduce_chunks_kernel<T, 2, SDDMM>
       : cpt <= 4 ? transpose_reduce_chunks_kernel<T, 4, SDDMM> : cpt <= 8 ? transpose_reduce_chunks_kernel<T, 8, SDDMM>
       : transpose_reduce_chunks_kernel<T, 16, SDDMM>;
}

template <typename T>
int launch_transpose_reduce(const T* coef, const int64_t* sorted_ids, const int64_t* perm, const int64_t* starts,
                            const T* X, const T* W, T* out, T* coef_sum, T* sddmm, float* partials, int64_t count,
                            int64_t k, int64_t d, int64_t n, int64_t chunk, int threads, int64_t cpt,
                            cudaStream_t s) {
  const int64_t chunks = dlm::cdiv(count, chunk);
  float* head = partials;
  float* tail = head + chunks * d;
  float* head_csum = tail + chunks * d;
  float* tail_csum = head_csum + chunks;
  if (chunks > 0) {
    const unsigned blocks = static_cast<unsigned>(chunks);
    if (W != nullptr && sddmm != nullptr)
      chunks_kernel_for<T, true>(cpt)<<<blocks, threads, 0, s>>>(coef, sorted_ids, perm, X, W, out, coef_sum, sddmm,
                                                                 head, tail, head_csum, tail_csum, count, k, d, chunk);
    else
      chunks_kernel_for<T, false>(cpt)<<<blocks, threads, 0, s>>>(coef, sorted_ids, perm, X, W, out, coef_sum, sddmm,
                                                                  head, tail, head_csum, tail_csum, count, k, d, chunk);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  transpose_reduce_fixup_kernel<T><<<static_cast<unsigned>(n), 256, 0, s>>>(starts, head, tail, head_csum, tail_csum,
                                                                          out, coef_sum, d, chunk);
  return dlm::last_error();
}

}  // namespace

extern "C" int dlm_gather_accumulate(const void* coef, const int64_t* idx, const void* W, void* out, int dtype,
                                     int64_t B, int64_t k, int64_t d, void* stream) {
  if (B == 0 || d == 0) return 0;
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(dlm::cdiv(d, kThreads * kGatherCols)));
  DLM_DISPATCH(dtype, T,
               gather_accumulate_kernel<T><<<grid, kThreads, 0, dlm::as_stream(stream)>>>(
                   static_cast<const T*>(coef), idx, static_cast<const T*>(W), static_cast<T*>(out), k, d));
  return dlm::last_error();
}

extern "C" int dlm_sddmm(const void* G, const int64_t* idx, const void* W, void* out, int dtype, int64_t B,
                         int64_t k, int64_t d, void* stream) {
  if (B == 0 || k == 0) return 0;
  DLM_DISPATCH(dtype, T,
               sddmm_kernel<T><<<static_cast<unsigned>(B), kThreads, 0, dlm::as_stream(stream)>>>(
                   static_cast<const T*>(G), idx, static_cast<const T*>(W), static_cast<T*>(out), k, d));
  return dlm::last_error();
}

extern "C" int64_t dlm_sort_workspace_bytes(int64_t count, int64_t n) {
  size_t bytes = 0;
  const cudaError_t err = cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const unsigned long long*>(nullptr),
                                  static_cast<unsigned long long*>(nullptr), static_cast<const int64_t*>(nullptr),
                                  static_cast<int64_t*>(nullptr), static_cast<int>(count), 0, id_bits(n));
  return err == cudaSuccess ? static_cast<int64_t>(bytes) : -static_cast<int64_t>(err);
}

extern "C" int dlm_sort_by_latent(const int64_t* idx, int64_t count, int64_t n, int64_t* sorted_ids, int64_t* perm,
                                  int64_t* starts, int64_t* perm_tmp, void* workspace, int64_t workspace_bytes,
                                  void* stream) {
  if (count > INT32_MAX) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = dlm::as_stream(stream);
  if (count > 0) {
    iota_kernel<<<static_cast<unsigned>(dlm::cdiv(count, 256)), 256, 0, s>>>(perm_tmp, count);
    size_t bytes = static_cast<size_t>(workspace_bytes);
    // ids are in [0, n): sorting them as unsigned over their low bits is stable and exact
    const cudaError_t err = cub::DeviceRadixSort::SortPairs(
        workspace, bytes, reinterpret_cast<const unsigned long long*>(idx),
        reinterpret_cast<unsigned long long*>(sorted_ids), perm_tmp, perm, static_cast<int>(count), 0, id_bits(n), s);
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  segment_starts_kernel<<<static_cast<unsigned>(dlm::cdiv(n + 1, 256)), 256, 0, s>>>(sorted_ids, count, n, starts);
  return dlm::last_error();
}

extern "C" int64_t dlm_transpose_reduce_partials(int64_t count, int64_t chunk, int64_t d) {
  return 2 * dlm::cdiv(count, chunk) * (d + 1);
}

extern "C" int dlm_transpose_reduce(const void* coef, const int64_t* sorted_ids, const int64_t* perm,
                                    const int64_t* starts, const void* X, const void* W, void* out, void* coef_sum,
                                    void* sddmm, float* partials, int dtype, int64_t B, int64_t k, int64_t d,
                                    int64_t n, int64_t chunk, void* stream) {
  if (n == 0) return 0;
  if (chunk < 1) return static_cast<int>(cudaErrorInvalidValue);
  // threads x CPT columns per thread cover d (d == 0 still writes coef_sum: one column slot, masked)
  const int threads = dlm::row_threads(d, 4);
  const int64_t cpt = dlm::cdiv(d > 0 ? d : 1, threads);
  if (cpt > 16) return static_cast<int>(cudaErrorInvalidValue);  // d > 16384
  DLM_DISPATCH(dtype, T,
               return launch_transpose_reduce<T>(
                   static_cast<const T*>(coef), sorted_ids, perm, starts, static_cast<const T*>(X),
                   static_cast<const T*>(W), static_cast<T*>(out), static_cast<T*>(coef_sum), static_cast<T*>(sddmm),
                   partials, B * k, k, d, n, chunk, threads, cpt, dlm::as_stream(stream)));
  return dlm::last_error();
}
