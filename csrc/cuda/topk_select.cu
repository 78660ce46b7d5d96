// Row-wise top-k by threshold-then-compact, one block per row.
//
// A relu'd float's bits read as uint32 are monotone in its value, so the k-th largest entry is found by a
// most-significant-byte-first radix search: four passes, each a 256-bin histogram (one per warp, merged) of the
// entries whose higher bytes equal the prefix found so far. Then one pass in index order writes every entry
// above the threshold and the lowest-index entries equal to it, their slots from a block-wide exclusive scan, so
// the selection is deterministic and rows with fewer than k positives are padded with zeros at distinct ids.
#include <cub/block/block_scan.cuh>

#include "common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T>
__device__ __forceinline__ uint32_t relu_key(const T* row, const uint8_t* keep, int64_t j) {
  float v = dlm::to_f32(row[j]);
  if (keep != nullptr && keep[j] == 0) v = 0.f;
  return v > 0.f ? __float_as_uint(v) : 0u;  // also maps -0.0 and NaN to 0
}

template <typename T>
__global__ void __launch_bounds__(kThreads) topk_select_kernel(
    const T* __restrict__ pre, int64_t cols, int64_t ld_pre, const uint8_t* __restrict__ keep,
    const int64_t* __restrict__ in_ids, int64_t id_offset, int k, float* __restrict__ out_vals,
    int64_t* __restrict__ out_ids, int64_t out_ld, int64_t out_col_offset) {
  using Scan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ unsigned hist[kWarps][256];
  __shared__ uint32_t s_prefix;
  __shared__ int s_krem;
  __shared__ unsigned s_base_gt, s_base_eq;

  const int64_t row = blockIdx.x;
  const T* p = pre + row * ld_pre;
  const int tid = threadIdx.x;

  // ---- the k-th largest key, a byte at a time ----
  uint32_t prefix = 0, mask = 0;
  int krem = k;  // how many entries >= the current prefix are still wanted
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < kWarps * 256; i += kThreads) (&hist[0][0])[i] = 0;
    __syncthreads();
    unsigned* h = hist[tid >> 5];
    for (int64_t j = tid; j < cols; j += kThreads) {
      const uint32_t key = relu_key(p, keep, j);
      // zeros (most of a ReLU row) are not counted: they would serialise on bin 0; see the digit choice below
      if (key != 0u && (key & mask) == prefix) atomicAdd(&h[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    for (int b = tid; b < 256; b += kThreads) {
      unsigned s = 0;
      for (int w = 0; w < kWarps; ++w) s += hist[w][b];
      hist[0][b] = s;
    }
    __syncthreads();
    if (tid == 0) {
      // the highest digit whose bin brings the count of larger entries to krem; if even bin 0's positive keys do
      // not, the digit is 0 anyway: the uncounted zero keys fill it (k <= cols), and krem excludes the bins above
      unsigned above = 0;
      int digit = 0;
      for (int b = 255; b >= 1; --b) {
        if (above + hist[0][b] >= static_cast<unsigned>(krem)) { digit = b; break; }
        above += hist[0][b];
      }
      s_prefix = prefix | (static_cast<uint32_t>(digit) << shift);
      s_krem = krem - static_cast<int>(above);
    }
    __syncthreads();
    prefix = s_prefix;
    krem = s_krem;
    mask |= 255u << shift;
  }
  const uint32_t threshold = prefix;
  const unsigned want_gt = static_cast<unsigned>(k - krem), want_eq = static_cast<unsigned>(krem);

  // ---- compact in index order ----
  if (tid == 0) { s_base_gt = 0; s_base_eq = 0; }
  __syncthreads();
  float* vals = out_vals + row * out_ld + out_col_offset;
  int64_t* ids = out_ids + row * out_ld + out_col_offset;
  for (int64_t j0 = 0; j0 < cols; j0 += kThreads) {
    const int64_t j = j0 + tid;
    const uint32_t key = j < cols ? relu_key(p, keep, j) : 0u;
    const bool gt = j < cols && key > threshold, eq = j < cols && key == threshold;
    unsigned long long pos, total;
    Scan(scan_storage).ExclusiveSum((static_cast<unsigned long long>(gt) << 32) | static_cast<unsigned>(eq), pos,
                                    total);
    const unsigned slot_gt = s_base_gt + static_cast<unsigned>(pos >> 32);
    const unsigned slot_eq = s_base_eq + static_cast<unsigned>(pos & 0xffffffffull);
    int64_t slot = -1;
    if (gt) slot = slot_gt;
    else if (eq && slot_eq < want_eq) slot = want_gt + slot_eq;
    if (slot >= 0) {
      vals[slot] = __uint_as_float(key);
      ids[slot] = in_ids != nullptr ? in_ids[row * cols + j] : id_offset + j;
    }
    __syncthreads();  // every thread has read the bases (and the scan storage is free again)
    if (tid == 0) {
      s_base_gt += static_cast<unsigned>(total >> 32);
      s_base_eq += static_cast<unsigned>(total & 0xffffffffull);
    }
    __syncthreads();
    if (s_base_gt == want_gt && s_base_eq >= want_eq) break;  // uniform: read from shared memory after a sync
  }
}

}  // namespace

extern "C" int dlm_topk_select(const void* pre, int dtype, int64_t rows, int64_t cols, int64_t ld_pre,
                               const uint8_t* keep, const int64_t* in_ids, int64_t id_offset, int64_t k,
                               float* out_vals, int64_t* out_ids, int64_t out_ld, int64_t out_col_offset,
                               void* stream) {
  if (k < 1 || k > cols || k > (1 << 30)) return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0) return 0;
  DLM_DISPATCH(dtype, T,
               topk_select_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, dlm::as_stream(stream)>>>(
                   static_cast<const T*>(pre), cols, ld_pre, keep, in_ids, id_offset, static_cast<int>(k), out_vals,
                   out_ids, out_ld, out_col_offset));
  return dlm::last_error();
}
