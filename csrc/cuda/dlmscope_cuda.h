/* dlmscope CUDA kernels: the C API of libdlmscope_cuda.so (plain CUDA, no torch headers).
 *
 * Every launcher takes raw device pointers, sizes, a dtype code and the cudaStream_t (as void*) to enqueue on;
 * it returns 0 or a cudaError_t (dlm_error_string gives the text). Nothing here allocates: scratch buffers are
 * passed in, sized by the *_workspace functions. Float tensors share one dtype per call (DLM_F32/F16/BF16),
 * accumulation is float32; ids are int64; every 2-D array is row-major with the given leading dimension.
 * Shapes: B rows, d model width, n latents, k active latents per row, count = B * k.
 */
#ifndef DLMSCOPE_CUDA_H
#define DLMSCOPE_CUDA_H
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { DLM_F32 = 0, DLM_F16 = 1, DLM_BF16 = 2 };

const char* dlm_error_string(int code);

/* The number of CUDA devices this library's runtime sees, or minus the cudaError_t (e.g. a driver older than the
 * CUDA version the library was built with). */
int dlm_device_count(void);

/* Make `device` current for this library's runtime on the calling thread (its own static cudart keeps its own
 * current device, so the caller sets the tensors' device before each launch). */
int dlm_set_device(int device);

/* Row-wise top-k of relu(pre) (threshold-then-compact: a 4-pass radix search for the k-th largest value, then a
 * block scan that writes the larger entries and, in index order, enough ties). pre [rows, cols] (ld_pre);
 * keep [cols] (uint8) or NULL: where 0 the entry counts as 0 (AuxK's mask). out_vals [rows, k] float32 and
 * out_ids [rows, k] int64 at out_col_offset within rows of out_ld; an id is in_ids[row * cols + j] if in_ids is
 * given (in_ids contiguous [rows, cols]), else id_offset + j. 1 <= k <= cols. NaN counts as 0 (as ReLU does in
 * the fused kernels; dlmscope.ops rejects NaN activations before). Rows with fewer than k positive entries are
 * padded with zeros at the lowest unused j. */
int dlm_topk_select(const void* pre, int dtype, int64_t rows, int64_t cols, int64_t ld_pre, const uint8_t* keep,
                    const int64_t* in_ids, int64_t id_offset, int64_t k, float* out_vals, int64_t* out_ids,
                    int64_t out_ld, int64_t out_col_offset, void* stream);

/* out[b] = sum_j coef[b, j] * W[idx[b, j]]   (coef [B, k], W [n, d], out [B, d]) */
int dlm_gather_accumulate(const void* coef, const int64_t* idx, const void* W, void* out, int dtype, int64_t B,
                          int64_t k, int64_t d, void* stream);

/* out[b, j] = <G[b], W[idx[b, j]]>   (G [B, d], W [n, d], out [B, k]) */
int dlm_sddmm(const void* G, const int64_t* idx, const void* W, void* out, int dtype, int64_t B, int64_t k,
              int64_t d, void* stream);

/* Stable sort of the count ids by latent: sorted_ids [count], perm [count] (flat positions b * k + j) and
 * starts [n + 1] (segment bounds). perm_tmp [count] int64 and workspace (dlm_sort_workspace_bytes; a negative
 * value is minus the cudaError_t of the size query) are scratch. */
int64_t dlm_sort_workspace_bytes(int64_t count, int64_t n);
int dlm_sort_by_latent(const int64_t* idx, int64_t count, int64_t n, int64_t* sorted_ids, int64_t* perm,
                       int64_t* starts, int64_t* perm_tmp, void* workspace, int64_t workspace_bytes, void* stream);

/* Transpose-reduce over a sorted layout, in chunks of `chunk` sorted entries (so a heavy latent is split across
 * blocks and reduced in a fix-up pass): out[i] = sum_{idx[b,j]=i} coef[b,j] X[b] and coef_sum[i], every row of
 * out written once (zeros for empty latents). With W (else NULL) also sddmm[b, j] = <X[b], W[idx[b, j]]>, each
 * W row read once per run. Scratch `partials` holds dlm_transpose_reduce_partials(count, chunk, d) floats. */
int64_t dlm_transpose_reduce_partials(int64_t count, int64_t chunk, int64_t d);
int dlm_transpose_reduce(const void* coef, const int64_t* sorted_ids, const int64_t* perm, const int64_t* starts,
                         const void* X, const void* W, void* out, void* coef_sum, void* sddmm, float* partials,
                         int dtype, int64_t B, int64_t k, int64_t d, int64_t n, int64_t chunk, void* stream);

/* In place per row: project grad off W's row, Adam (torch.optim.Adam: bias-corrected, eps after the sqrt),
 * renormalise; zero rows as dlmscope/reference.py (unprojected gradient; an updated zero row stays zero). */
int dlm_decoder_norm_step(void* W, const void* grad, void* exp_avg, void* exp_avg_sq, int dtype, int64_t n,
                          int64_t d, float one_m_b1, float beta2, float one_m_b2, float step_size, float sqrt_bc2,
                          float eps, void* stream);

#ifdef __cplusplus
}
#endif
#endif
