// The one binding file of dlmscope._C (pybind11 through torch/extension.h): the CPU kernels of csrc/cpu.
#include <torch/extension.h>

#include "cpu/kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dlmscope native kernels (CPU, C++/OpenMP)";
  namespace py = pybind11;
  using namespace dlmscope::cpu;

  m.def("topk_encode", &topk_encode,
        "Fused (x - b_dec) @ W_enc.T + b_enc -> relu -> top-k per row, tiled; returns (values [B,k], indices [B,k] "
        "int64); order within a row unspecified; rows with < k positive entries padded with zeros at unused ids",
        py::arg("x"), py::arg("W_enc"), py::arg("b_enc"), py::arg("b_dec"), py::arg("k"), py::arg("row_block") = 0,
        py::arg("latent_block") = 0);
  m.def("topk_encode_grouped", &topk_encode_grouped,
        "Several stacked SAEs' top-k (segments of ``sizes`` latents, one k each) plus an optional per-segment AuxK "
        "top-k among aux_mask latents, off one tiled GEMM pass; returns (values [B,sum(ks)], indices, aux_values "
        "[B,sum(k_aux)], aux_indices), indices global int64, blocks in segment order",
        py::arg("x"), py::arg("W_enc"), py::arg("b_enc"), py::arg("b_dec"), py::arg("ks"), py::arg("sizes"),
        py::arg("aux_mask") = py::none(), py::arg("k_aux") = std::vector<int64_t>{}, py::arg("row_block") = 0,
        py::arg("latent_block") = 0);
  m.def("gather_accumulate", &gather_accumulate, "out[b] = sum_j coef[b,j] * W[idx[b,j]]", py::arg("coef"),
        py::arg("idx"), py::arg("W"));
  m.def("transpose_reduce", &transpose_reduce,
        "(out [n,d], coef_sum [n], sddmm [B,k] or empty): out[i] = sum_{idx[b,j]=i} coef[b,j] X[b]; with W also "
        "sddmm[b,j] = <X[b], W[idx[b,j]]>",
        py::arg("coef"), py::arg("idx"), py::arg("X"), py::arg("n"), py::arg("W") = py::none());
  m.def("sddmm", &sddmm, "out[b,j] = <G[b], W[idx[b,j]]>", py::arg("G"), py::arg("idx"), py::arg("W"));
  m.def("decoder_norm_step", &decoder_norm_step,
        "In place: project grad off W's unit rows, Adam step (torch.optim.Adam semantics), renormalise rows",
        py::arg("W"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("step"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"));
}
