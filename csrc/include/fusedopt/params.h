// Plain parameter structs per op (pointers, sizes, strides, scalars, device-scalar
// pointers) shared by the CUDA and CPU entry points.
#pragma once

#include "fusedopt/params_loss.h"
#include "fusedopt/params_optim.h"
