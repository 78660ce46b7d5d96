// Small helpers shared by the CPU kernels.
#pragma once

#include <torch/extension.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace dlmscope {
namespace cpu {

// at::empty for a large output, with transparent huge pages requested before the first touch (Linux, THP in
// "madvise" mode): a fresh 32 MiB gradient otherwise costs ~8k page faults, measured at ~2.5x the time of writing it.
// A no-op for small tensors, for memory that was already touched, and off Linux.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t e = p + static_cast<uintptr_t>(t.nbytes());
  const uintptr_t a = (p + kHuge - 1) & ~(kHuge - 1), b = e & ~(kHuge - 1);
  if (b > a) (void)madvise(reinterpret_cast<void*>(a), b - a, MADV_HUGEPAGE);
#endif
  return t;
}

}  // namespace cpu
}  // namespace dlmscope
