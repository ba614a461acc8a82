// The pybind11 functions of the loss kernels, shared by fusedopt._cpu and fusedopt._cuda:
// the same argument lists fill the same params structs (params_loss.h); only the last
// argument differs -- `num_threads` (cpu) or `stream`, a cudaStream_t as an integer (cuda).
//
// Tensors arrive as addresses (uintptr_t, 0 = absent), strides in elements, dtype codes of
// dispatch.h and index-type codes of params_loss.h. Each call runs the kernel without the
// GIL and returns its status code (LossStatus on cpu, cudaError_t on cuda; 0 = ok).
//
// `Kernels` provides: using Extra = <type of the last argument>;
//   static int cross_entropy(const CrossEntropyParams&, Extra, uintptr_t workspace);
//   static int focal(const FocalParams&, Extra);
//   static int sigmoid_focal(const SigmoidFocalParams&, Extra);
//   static int scale_grad(void* grad, int64_t n, int dtype, const float* scale, Extra);
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>

#include "fusedopt/params_loss.h"

namespace fusedopt::bind {

template <typename P>
P* address_to(uintptr_t a) { return reinterpret_cast<P*>(a); }

template <class Kernels>
void register_loss_functions(pybind11::module_& m, const char* extra_name) {
  namespace py = pybind11;
  using Extra = typename Kernels::Extra;
  m.def("cross_entropy_fwd",
        [](uintptr_t logits, int64_t logits_row_stride, uintptr_t grad, int64_t grad_row_stride,
           uintptr_t row_loss, uintptr_t target, int64_t target_row_stride, uintptr_t weight,
           uintptr_t scales, int64_t n_rows, int64_t n_cols, int dtype, int index_type,
           int64_t ignore_index, float label_smoothing, float z_loss, float softcap,
           bool soft_target, Extra extra, uintptr_t workspace) {
          CrossEntropyParams p;
          p.logits = address_to<const void>(logits);
          p.logits_row_stride = logits_row_stride;
          p.grad = address_to<void>(grad);
          p.grad_row_stride = grad_row_stride;
          p.row_loss = address_to<float>(row_loss);
          p.target = address_to<const void>(target);
          p.target_row_stride = target_row_stride;
          p.weight = address_to<const float>(weight);
          p.scales = address_to<const float>(scales);
          p.n_rows = n_rows;
          p.n_cols = n_cols;
          p.dtype = dtype;
          p.index_type = index_type;
          p.ignore_index = ignore_index;
          p.label_smoothing = label_smoothing;
          p.z_loss = z_loss;
          p.softcap = softcap;
          p.soft_target = soft_target;
          py::gil_scoped_release release;
          return Kernels::cross_entropy(p, extra, workspace);
        },
        py::arg("logits"), py::arg("logits_row_stride"), py::arg("grad"),
        py::arg("grad_row_stride"), py::arg("row_loss"), py::arg("target"),
        py::arg("target_row_stride"), py::arg("weight"), py::arg("scales"), py::arg("n_rows"),
        py::arg("n_cols"), py::arg("dtype"), py::arg("index_type"), py::arg("ignore_index"),
        py::arg("label_smoothing"), py::arg("z_loss"), py::arg("softcap"),
        py::arg("soft_target"), py::arg(extra_name), py::arg("workspace") = uintptr_t(0),
        "Fused cross-entropy: row losses and (grad != 0) the gradient. Returns a status code.");
  m.def("focal_loss_fwd",
        [](uintptr_t logits, int64_t logits_row_stride, uintptr_t grad, int64_t grad_row_stride,
           uintptr_t row_loss, uintptr_t target, uintptr_t alpha, uintptr_t scales,
           int64_t n_rows, int64_t n_cols, int dtype, int index_type, int64_t ignore_index,
           float gamma, float label_smoothing, Extra extra) {
          FocalParams p;
          p.logits = address_to<const void>(logits);
          p.logits_row_stride = logits_row_stride;
          p.grad = address_to<void>(grad);
          p.grad_row_stride = grad_row_stride;
          p.row_loss = address_to<float>(row_loss);
          p.target = address_to<const void>(target);
          p.alpha = address_to<const float>(alpha);
          p.scales = address_to<const float>(scales);
          p.n_rows = n_rows;
          p.n_cols = n_cols;
          p.dtype = dtype;
          p.index_type = index_type;
          p.ignore_index = ignore_index;
          p.gamma = gamma;
          p.label_smoothing = label_smoothing;
          py::gil_scoped_release release;
          return Kernels::focal(p, extra);
        },
        py::arg("logits"), py::arg("logits_row_stride"), py::arg("grad"),
        py::arg("grad_row_stride"), py::arg("row_loss"), py::arg("target"), py::arg("alpha"),
        py::arg("scales"), py::arg("n_rows"), py::arg("n_cols"), py::arg("dtype"),
        py::arg("index_type"), py::arg("ignore_index"), py::arg("gamma"),
        py::arg("label_smoothing"), py::arg(extra_name),
        "Softmax focal loss: row losses and (grad != 0) the gradient. Returns a status code.");
  m.def("sigmoid_focal_loss_fwd",
        [](uintptr_t logits, uintptr_t target, uintptr_t loss, uintptr_t grad, uintptr_t scales,
           int64_t n, int dtype, float alpha, float gamma, float label_smoothing, bool reduce,
           Extra extra) {
          SigmoidFocalParams p;
          p.logits = address_to<const void>(logits);
          p.target = address_to<const void>(target);
          p.loss = address_to<void>(loss);
          p.grad = address_to<void>(grad);
          p.scales = address_to<const float>(scales);
          p.n = n;
          p.dtype = dtype;
          p.alpha = alpha;
          p.gamma = gamma;
          p.label_smoothing = label_smoothing;
          p.reduce = reduce;
          py::gil_scoped_release release;
          return Kernels::sigmoid_focal(p, extra);
        },
        py::arg("logits"), py::arg("target"), py::arg("loss"), py::arg("grad"),
        py::arg("scales"), py::arg("n"), py::arg("dtype"), py::arg("alpha"), py::arg("gamma"),
        py::arg("label_smoothing"), py::arg("reduce"), py::arg(extra_name),
        "Sigmoid focal loss: per-element loss or partial sums, and the gradient.");
  m.def("scale_grad",
        [](uintptr_t grad, int64_t n, int dtype, uintptr_t scale, Extra extra) {
          py::gil_scoped_release release;
          return Kernels::scale_grad(address_to<void>(grad), n, dtype,
                                     address_to<const float>(scale), extra);
        },
        py::arg("grad"), py::arg("n"), py::arg("dtype"), py::arg("scale"), py::arg(extra_name),
        "grad *= *scale in place (nothing written when *scale == 1). Returns a status code.");
  m.attr("SIGMOID_FOCAL_SPAN") = kSigmoidFocalSpan;
}

}  // namespace fusedopt::bind
