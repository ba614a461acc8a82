#include "register.h"

namespace fusedopt::bind {
void register_cuda_losses(pybind11::module_& m) { (void)m; }
}  // namespace fusedopt::bind
