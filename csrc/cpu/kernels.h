// dlmscope CPU kernels (C++ / OpenMP through ATen's parallel_for). Declarations shared with the binding file.
//
// Conventions (docs/design.md): x [B,d]; W_enc / W_dec [n,d] row-major (latent rows contiguous); k active latents per
// row; indices int64. All float tensors of one call share one dtype (float32 or float64) and are contiguous;
// validation happens in Python (dlmscope/ops.py) — the TORCH_CHECKs here are cheap sanity checks only.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

namespace dlmscope {
namespace cpu {

// Fused encoder: values/indices of the k largest relu((x - b_dec) @ W_enc.T + b_enc) per row; never materialises
// the B x n pre-activations. ``row_block`` / ``latent_block`` override the tile shape (0 = automatic).
std::tuple<at::Tensor, at::Tensor> topk_encode(const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc,
                                               const at::Tensor& b_dec, int64_t k, int64_t row_block,
                                               int64_t latent_block);

// Several Top-K encoders stacked along the latent axis (W_enc [S,d] = segments of ``sizes`` latents), off ONE tiled
// GEMM pass: segment g keeps its ks[g] largest relu'd pre-activations and, with ``aux_mask`` [S] bool, also its
// k_aux[g] largest among masked latents (unmasked count as -inf; padded with zeros at distinct unused ids of the
// segment). Returns (values [B,sum(ks)], indices, aux_values [B,sum(k_aux)] (width 0 without a mask), aux_indices),
// indices int64 global in [0,S), blocks in segment order. ``topk_encode`` is its one-segment, no-aux case.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_encode_grouped(
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, const at::Tensor& b_dec,
    const std::vector<int64_t>& ks, const std::vector<int64_t>& sizes, const std::optional<at::Tensor>& aux_mask,
    const std::vector<int64_t>& k_aux, int64_t row_block, int64_t latent_block);

// out[b] = sum_j coef[b,j] * W[idx[b,j]]
at::Tensor gather_accumulate(const at::Tensor& coef, const at::Tensor& idx, const at::Tensor& W);

// out[i] = sum over (b,j) with idx[b,j] == i of coef[b,j] * X[b]; coef_sum[i] = sum of those coef;
// if W is given, also sddmm[b,j] = <X[b], W[idx[b,j]]> in the same pass (else an empty tensor).
std::tuple<at::Tensor, at::Tensor, at::Tensor> transpose_reduce(const at::Tensor& coef, const at::Tensor& idx,
                                                                const at::Tensor& X, int64_t n,
                                                                const std::optional<at::Tensor>& W);

// out[b,j] = <G[b], W[idx[b,j]]>
at::Tensor sddmm(const at::Tensor& G, const at::Tensor& idx, const at::Tensor& W);

// In place: project grad rows off the unit rows of W, Adam (torch.optim.Adam semantics), renormalise W's rows.
void decoder_norm_step(at::Tensor& W, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                       int64_t step, double lr, double beta1, double beta2, double eps);

}  // namespace cpu
}  // namespace dlmscope
