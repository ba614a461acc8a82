// pybind11 bindings of the CPU vocab-parallel cross-entropy (module fusedopt._cpu): the
// row statistics and the gradient of one rank's columns (csrc/cpu/vocab_parallel.cpp).
// Tensors arrive as addresses (uintptr_t, 0 = absent), strides in elements; each call runs
// without the GIL and returns a LossStatus code (0 = ok).
#include <cstdint>

#include "fusedopt/cpu_vocab_parallel.h"
#include "register.h"

namespace py = pybind11;

namespace fusedopt::bind {
namespace {

template <typename P>
P* address(uintptr_t a) { return reinterpret_cast<P*>(a); }

cpu::VocabParallelParams params(uintptr_t logits, int64_t logits_row_stride, uintptr_t target,
                                int64_t target_row_stride, uintptr_t weight, int64_t n_rows,
                                int64_t n_cols, int64_t class_offset, int64_t num_classes,
                                int64_t ignore_index, int dtype, int index_type,
                                float label_smoothing, float softcap, bool soft_target) {
  cpu::VocabParallelParams p;
  p.logits = address<const void>(logits);
  p.logits_row_stride = logits_row_stride;
  p.target = address<const void>(target);
  p.target_row_stride = target_row_stride;
  p.weight = address<const float>(weight);
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

}  // namespace

void register_cpu_vocab_parallel(py::module_& m) {
  m.def("vocab_parallel_row_stats",
        [](uintptr_t logits, int64_t logits_row_stride, uintptr_t target,
           int64_t target_row_stride, uintptr_t weight, uintptr_t stats, int64_t n_rows,
           int64_t n_cols, int64_t class_offset, int64_t num_classes, int64_t ignore_index,
           int dtype, int index_type, float label_smoothing, float softcap, bool soft_target,
           int num_threads) {
          cpu::VocabParallelParams p = params(
              logits, logits_row_stride, target, target_row_stride, weight, n_rows, n_cols,
              class_offset, num_classes, ignore_index, dtype, index_type, label_smoothing,
              softcap, soft_target);
          p.stats = address<float>(stats);
          py::gil_scoped_release release;
          return cpu::vocab_parallel_row_stats(p, num_threads);
        },
        py::arg("logits"), py::arg("logits_row_stride"), py::arg("target"),
        py::arg("target_row_stride"), py::arg("weight"), py::arg("stats"), py::arg("n_rows"),
        py::arg("n_cols"), py::arg("class_offset"), py::arg("num_classes"),
        py::arg("ignore_index"), py::arg("dtype"), py::arg("index_type"),
        py::arg("label_smoothing"), py::arg("softcap"), py::arg("soft_target"),
        py::arg("num_threads"),
        "Row statistics (n_rows, 4) fp32 of this rank's columns; a LossStatus code.");
  m.def("vocab_parallel_grad",
        [](uintptr_t logits, int64_t logits_row_stride, uintptr_t target,
           int64_t target_row_stride, uintptr_t weight, uintptr_t coefs, uintptr_t grad,
           int64_t grad_row_stride, int64_t n_rows, int64_t n_cols, int64_t class_offset,
           int64_t num_classes, int64_t ignore_index, int dtype, int index_type,
           float label_smoothing, float softcap, bool soft_target, int num_threads) {
          cpu::VocabParallelParams p = params(
              logits, logits_row_stride, target, target_row_stride, weight, n_rows, n_cols,
              class_offset, num_classes, ignore_index, dtype, index_type, label_smoothing,
              softcap, soft_target);
          p.coefs = address<const float>(coefs);
          p.grad = address<void>(grad);
          p.grad_row_stride = grad_row_stride;
          py::gil_scoped_release release;
          return cpu::vocab_parallel_grad(p, num_threads);
        },
        py::arg("logits"), py::arg("logits_row_stride"), py::arg("target"),
        py::arg("target_row_stride"), py::arg("weight"), py::arg("coefs"), py::arg("grad"),
        py::arg("grad_row_stride"), py::arg("n_rows"), py::arg("n_cols"),
        py::arg("class_offset"), py::arg("num_classes"), py::arg("ignore_index"),
        py::arg("dtype"), py::arg("index_type"), py::arg("label_smoothing"),
        py::arg("softcap"), py::arg("soft_target"), py::arg("num_threads"),
        "The gradient of this rank's columns from the combined coefficients (n_rows, 5).");
}

}  // namespace fusedopt::bind
