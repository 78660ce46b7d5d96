// Shared by the .cu files: dtype loads/stores (math in float32), the dtype dispatch, block reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "dlmscope_cuda.h"

namespace dlm {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

inline cudaStream_t as_stream(void* s) { return reinterpret_cast<cudaStream_t>(s); }
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads of a kernel that holds a row of d columns in registers, cpt = ceil(d / threads) per thread: at most
// `target_cpt` while 1024 threads suffice (the kernels carry __launch_bounds__(1024): <= 64 registers per thread),
// more (and spilling) beyond; the launchers reject cpt > 16.
inline int row_threads(int64_t d, int target_cpt) {
  int threads = 128;
  while (threads < 1024 && threads * target_cpt < d) threads *= 2;
  return threads;
}

// The launch's error (a bad configuration) or 0.
inline int last_error() { return static_cast<int>(cudaGetLastError()); }

// Sum of v over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result. `scratch` holds
// 32 floats; the trailing sync lets the caller reuse it at once.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < warps; ++w) total += scratch[w];  // same order in every thread: one result
  __syncthreads();
  return total;
}

}  // namespace dlm

// DLM_DISPATCH(dtype, T, body): runs body with T the element type of dtype; an unknown code returns
// cudaErrorInvalidValue from the enclosing launcher.
#define DLM_DISPATCH(dtype, T, ...)                                        \
  switch (dtype) {                                                         \
    case DLM_F32: { using T = float; __VA_ARGS__; break; }                 \
    case DLM_F16: { using T = __half; __VA_ARGS__; break; }                \
    case DLM_BF16: { using T = __nv_bfloat16; __VA_ARGS__; break; }        \
    default: return static_cast<int>(cudaErrorInvalidValue);               \
  }
