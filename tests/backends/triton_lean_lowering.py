"""Compile the Triton lean Adam kernel for sm_90 without a GPU, with the launcher's
``enable_fp_fusion=False``, and print, as one JSON line per variant, the counts of the
fp32/fp64 arithmetic instructions that decide its rounding (fma, div, sqrt) and of its
global loads/stores and atomics.

Run by tests/backends/test_triton_lean_lowering.py in a process WITHOUT TRITON_INTERPRET
(the interpreter replaces @triton.jit functions).  Exit code 3: no usable toolchain here.
"""

import json
import re
import sys
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget

from fusedopt.backends.triton import lean_adam

POINTERS = {"static_ptr": "*i64", "grad_table_ptr": "*i64", "chunk_table_ptr": "*i64",
            "counter_ptr": "*i32"}
ELEMENT = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
MOMENTS = {0: ("*fp32", "*fp32"), 1: ("*bf16", "*bf16"), 2: ("*i8", "*u8")}
INTS = ("lr_bits", "beta1_bits", "beta2_bits", "eps_bits", "weight_decay_bits", "seed")


def ptx_counts(param, state, **flags):
    constexprs = dict(CHUNK=65536, BLOCK=256 if state == 2 else 1024, STATE=state,
                      LR_TENSOR=False, BETA1_TENSOR=False, BETA2_TENSOR=False,
                      HAS_INV_SCALE=True, HAS_CLIP=True, HAS_SKIP=True, L2=False,
                      DECOUPLED=True, MAXIMIZE=False, HAS_MASTER=False, STOCHASTIC=False)
    constexprs.update(flags)
    kernel = lean_adam._lean_adam_kernel
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "base_p":
            signature[name] = ELEMENT[param]
        elif name == "base_m":
            signature[name] = MOMENTS[state][0]
        elif name == "base_v":
            signature[name] = MOMENTS[state][1]
        elif name in POINTERS:
            signature[name] = POINTERS[name]
        elif name in INTS:
            signature[name] = "i64"
        else:
            signature[name] = "*fp32"
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={"enable_fp_fusion": False}).asm["ptx"]
    pattern = r"\b(fma\.[\w.]+|div\.[\w.]+|sqrt\.[\w.]+|(?:ld|st)\.global\.[\w.]+|atom\.[\w.]+)"
    return dict(Counter(re.findall(pattern, ptx)))


def main():
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        get_ptxas(90).path
    except Exception as exc:  # noqa: BLE001  (any failure to find the toolchain)
        print(f"no ptxas: {exc}")
        sys.exit(3)
    print(json.dumps({
        "fp32-params-fp32-moments": ptx_counts("fp32", 0),
        "fp32-params-bf16-moments": ptx_counts("fp32", 1),
        "fp32-params-8bit-moments": ptx_counts("fp32", 2),
        "bf16-params-stochastic-8bit-l2": ptx_counts("bf16", 2, STOCHASTIC=True, L2=True,
                                                     DECOUPLED=False, MAXIMIZE=True),
        "fp16-params-stochastic-bf16-tensor-hyper": ptx_counts(
            "fp16", 1, STOCHASTIC=True, LR_TENSOR=True, BETA1_TENSOR=True, BETA2_TENSOR=True),
        "bf16-params-master-8bit": ptx_counts("bf16", 2, HAS_MASTER=True),
    }))


if __name__ == "__main__":
    main()
