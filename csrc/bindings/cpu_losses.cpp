// pybind11 bindings of the CPU loss kernels (module fusedopt._cpu).
//
// Tensors arrive as addresses (uintptr_t, 0 = absent), strides in elements, dtype codes of
// dispatch.h and index-type codes of params_loss.h. Each call fills a params struct, runs
// the kernel without the GIL and returns its LossStatus code (0 = ok).
#include <cstdint>

#include "fusedopt/cpu_losses.h"
#include "register.h"

namespace py = pybind11;

namespace fusedopt::bind {
namespace {

template <typename P>
P* ptr(uintptr_t a) { return reinterpret_cast<P*>(a); }

int cross_entropy_fwd(uintptr_t logits, int64_t logits_row_stride, uintptr_t grad,
                      int64_t grad_row_stride, uintptr_t row_loss, uintptr_t target,
                      int64_t target_row_stride, uintptr_t weight, uintptr_t scales,
                      int64_t n_rows, int64_t n_cols, int dtype, int index_type,
                      int64_t ignore_index, float label_smoothing, float z_loss, float softcap,
                      bool soft_target, int num_threads) {
  CrossEntropyParams p;
  p.logits = ptr<const void>(logits);
  p.logits_row_stride = logits_row_stride;
  p.grad = ptr<void>(grad);
  p.grad_row_stride = grad_row_stride;
  p.row_loss = ptr<float>(row_loss);
  p.target = ptr<const void>(target);
  p.target_row_stride = target_row_stride;
  p.weight = ptr<const float>(weight);
  p.scales = ptr<const float>(scales);
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
  return cpu::cross_entropy_fwd(p, num_threads);
}

int focal_loss_fwd(uintptr_t logits, int64_t logits_row_stride, uintptr_t grad,
                   int64_t grad_row_stride, uintptr_t row_loss, uintptr_t target,
                   uintptr_t alpha, uintptr_t scales, int64_t n_rows, int64_t n_cols, int dtype,
                   int index_type, int64_t ignore_index, float gamma, float label_smoothing,
                   int num_threads) {
  FocalParams p;
  p.logits = ptr<const void>(logits);
  p.logits_row_stride = logits_row_stride;
  p.grad = ptr<void>(grad);
  p.grad_row_stride = grad_row_stride;
  p.row_loss = ptr<float>(row_loss);
  p.target = ptr<const void>(target);
  p.alpha = ptr<const float>(alpha);
  p.scales = ptr<const float>(scales);
  p.n_rows = n_rows;
  p.n_cols = n_cols;
  p.dtype = dtype;
  p.index_type = index_type;
  p.ignore_index = ignore_index;
  p.gamma = gamma;
  p.label_smoothing = label_smoothing;
  py::gil_scoped_release release;
  return cpu::focal_loss_fwd(p, num_threads);
}

int sigmoid_focal_loss_fwd(uintptr_t logits, uintptr_t target, uintptr_t loss, uintptr_t grad,
                           uintptr_t scales, int64_t n, int dtype, float alpha, float gamma,
                           float label_smoothing, bool reduce, int num_threads) {
  SigmoidFocalParams p;
  p.logits = ptr<const void>(logits);
  p.target = ptr<const void>(target);
  p.loss = ptr<void>(loss);
  p.grad = ptr<void>(grad);
  p.scales = ptr<const float>(scales);
  p.n = n;
  p.dtype = dtype;
  p.alpha = alpha;
  p.gamma = gamma;
  p.label_smoothing = label_smoothing;
  p.reduce = reduce;
  py::gil_scoped_release release;
  return cpu::sigmoid_focal_loss_fwd(p, num_threads);
}

int scale_grad(uintptr_t grad, int64_t n, int dtype, uintptr_t scale, int num_threads) {
  py::gil_scoped_release release;
  return cpu::scale_grad(ptr<void>(grad), n, dtype, ptr<const float>(scale), num_threads);
}

int advise_huge_pages(uintptr_t data, int64_t bytes) {
  return cpu::advise_huge_pages(ptr<void>(data), bytes);
}

}  // namespace

void register_cpu_losses(py::module_& m) {
  m.def("cross_entropy_fwd", &cross_entropy_fwd, py::arg("logits"), py::arg("logits_row_stride"),
        py::arg("grad"), py::arg("grad_row_stride"), py::arg("row_loss"), py::arg("target"),
        py::arg("target_row_stride"), py::arg("weight"), py::arg("scales"), py::arg("n_rows"),
        py::arg("n_cols"), py::arg("dtype"), py::arg("index_type"), py::arg("ignore_index"),
        py::arg("label_smoothing"), py::arg("z_loss"), py::arg("softcap"),
        py::arg("soft_target"), py::arg("num_threads"),
        "Fused cross-entropy: row losses and (grad != 0) the gradient. Returns a status code.");
  m.def("focal_loss_fwd", &focal_loss_fwd, py::arg("logits"), py::arg("logits_row_stride"),
        py::arg("grad"), py::arg("grad_row_stride"), py::arg("row_loss"), py::arg("target"),
        py::arg("alpha"), py::arg("scales"), py::arg("n_rows"), py::arg("n_cols"),
        py::arg("dtype"), py::arg("index_type"), py::arg("ignore_index"), py::arg("gamma"),
        py::arg("label_smoothing"), py::arg("num_threads"),
        "Softmax focal loss: row losses and (grad != 0) the gradient. Returns a status code.");
  m.def("sigmoid_focal_loss_fwd", &sigmoid_focal_loss_fwd, py::arg("logits"), py::arg("target"),
        py::arg("loss"), py::arg("grad"), py::arg("scales"), py::arg("n"), py::arg("dtype"),
        py::arg("alpha"), py::arg("gamma"), py::arg("label_smoothing"), py::arg("reduce"),
        py::arg("num_threads"),
        "Sigmoid focal loss: per-element loss or partial sums, and the gradient.");
  m.def("scale_grad", &scale_grad, py::arg("grad"), py::arg("n"), py::arg("dtype"),
        py::arg("scale"), py::arg("num_threads"),
        "grad *= *scale in place (nothing written when *scale == 1). Returns a status code.");
  m.def("advise_huge_pages", &advise_huge_pages, py::arg("data"), py::arg("bytes"),
        "madvise(MADV_HUGEPAGE) on the 2 MiB-aligned interior of a buffer; 0 or errno.");
  m.attr("SIGMOID_FOCAL_SPAN") = kSigmoidFocalSpan;
}

}  // namespace fusedopt::bind
