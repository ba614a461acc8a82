#include "register.h"

namespace fusedopt::bind {
void register_cpu_optim(pybind11::module_& m) { (void)m; }
}  // namespace fusedopt::bind
