// The pybind11 functions of the vocab-parallel cross-entropy kernels, shared by
// fusedopt._cpu (cpu_vocab_parallel.cpp) and fusedopt._cuda (cuda_vocab_parallel.cpp): the
// same argument lists fill the same params struct (params_vocab_parallel.h); only the last
// argument differs -- `num_threads` (cpu) or `stream`, a cudaStream_t as an integer (cuda).
//
// Tensors arrive as addresses (uintptr_t, 0 = absent), strides in elements, dtype codes of
// dispatch.h and index-type codes of params_loss.h. Each call runs the kernel without the
// GIL and returns its status code (LossStatus on cpu, cudaError_t on cuda; 0 = ok).
//
// `Kernels` provides: using Extra = <type of the last argument>;
//   static int row_stats(const VocabParallelParams&, Extra);
//   static int grad(const VocabParallelParams&, Extra);
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>

#include "fusedopt/params_vocab_parallel.h"
#include "loss_bindings.h"

namespace fusedopt::bind {

// The fields both passes take.
inline VocabParallelParams vocab_parallel_params(
    uintptr_t logits, int64_t logits_row_stride, uintptr_t target, int64_t target_row_stride,
    uintptr_t weight, int64_t n_rows, int64_t n_cols, int64_t class_offset, int64_t num_classes,
    int64_t ignore_index, int dtype, int index_type, float label_smoothing, float softcap,
    bool soft_target) {
  VocabParallelParams p;
  p.logits = address_to<const void>(logits);
  p.logits_row_stride = logits_row_stride;
  p.target = address_to<const void>(target);
  p.target_row_stride = target_row_stride;
  p.weight = address_to<const float>(weight);
  p.n_rows = n_rows;
  p.n_cols = n_cols;
  p.class_offset = class_offset;
  p.num_classes = num_classes;
  p.ignore_index = ignore_index;
  p.dtype = dtype;
  p.index_type = index_type;
  p.label_smoothing = label_smoothing;
  p.softcap = softcap;
  p.soft_target = soft_target;
  return p;
}

template <class Kernels>
void register_vocab_parallel_functions(pybind11::module_& m, const char* extra_name) {
  namespace py = pybind11;
  using Extra = typename Kernels::Extra;
  m.def("vocab_parallel_row_stats",
        [](uintptr_t logits, int64_t logits_row_stride, uintptr_t target,
           int64_t target_row_stride, uintptr_t weight, uintptr_t stats, int64_t n_rows,
           int64_t n_cols, int64_t class_offset, int64_t num_classes, int64_t ignore_index,
           int dtype, int index_type, float label_smoothing, float softcap, bool soft_target,
           Extra extra) {
          VocabParallelParams p = vocab_parallel_params(
              logits, logits_row_stride, target, target_row_stride, weight, n_rows, n_cols,
              class_offset, num_classes, ignore_index, dtype, index_type, label_smoothing,
              softcap, soft_target);
          p.stats = address_to<float>(stats);
          py::gil_scoped_release release;
          return Kernels::row_stats(p, extra);
        },
        py::arg("logits"), py::arg("logits_row_stride"), py::arg("target"),
        py::arg("target_row_stride"), py::arg("weight"), py::arg("stats"), py::arg("n_rows"),
        py::arg("n_cols"), py::arg("class_offset"), py::arg("num_classes"),
        py::arg("ignore_index"), py::arg("dtype"), py::arg("index_type"),
        py::arg("label_smoothing"), py::arg("softcap"), py::arg("soft_target"),
        py::arg(extra_name),
        "Row statistics (n_rows, 4) fp32 of this rank's columns. Returns a status code.");
  m.def("vocab_parallel_grad",
        [](uintptr_t logits, int64_t logits_row_stride, uintptr_t target,
           int64_t target_row_stride, uintptr_t weight, uintptr_t coefs, uintptr_t grad,
           int64_t grad_row_stride, int64_t n_rows, int64_t n_cols, int64_t class_offset,
           int64_t num_classes, int64_t ignore_index, int dtype, int index_type,
           float label_smoothing, float softcap, bool soft_target, Extra extra) {
          VocabParallelParams p = vocab_parallel_params(
              logits, logits_row_stride, target, target_row_stride, weight, n_rows, n_cols,
              class_offset, num_classes, ignore_index, dtype, index_type, label_smoothing,
              softcap, soft_target);
          p.coefs = address_to<const float>(coefs);
          p.grad = address_to<void>(grad);
          p.grad_row_stride = grad_row_stride;
          py::gil_scoped_release release;
          return Kernels::grad(p, extra);
        },
        py::arg("logits"), py::arg("logits_row_stride"), py::arg("target"),
        py::arg("target_row_stride"), py::arg("weight"), py::arg("coefs"), py::arg("grad"),
        py::arg("grad_row_stride"), py::arg("n_rows"), py::arg("n_cols"),
        py::arg("class_offset"), py::arg("num_classes"), py::arg("ignore_index"),
        py::arg("dtype"), py::arg("index_type"), py::arg("label_smoothing"),
        py::arg("softcap"), py::arg("soft_target"), py::arg(extra_name),
        "The gradient of this rank's columns from the combined coefficients (n_rows, 5). "
        "Returns a status code.");
}

}  // namespace fusedopt::bind
