#include "register.h"

namespace fusedopt::bind {
void register_cuda_optim(pybind11::module_& m) { (void)m; }
}  // namespace fusedopt::bind
