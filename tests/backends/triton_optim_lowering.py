"""Compile the Triton optimizer kernels for sm_90 without a GPU and print, as one JSON line,
the global memory / atomic instructions of each variant's PTX.

Run by tests/backends/test_triton_multi_tensor.py in a process WITHOUT TRITON_INTERPRET
(the interpreter replaces @triton.jit functions).  Exit code 3: no usable toolchain here.
"""

import json
import re
import sys
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget

from fusedopt.backends.triton import multi_tensor as mt
from fusedopt.backends.triton import optim

TABLE_POINTERS = {"static_ptr": "*i64", "grad_table_ptr": "*i64", "chunk_table_ptr": "*i64",
                  "counter_ptr": "*i32"}
ELEMENT = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
VEC = {"fp32": 4, "bf16": 8, "fp16": 8}


def ptx_ops(kernel, dtype, constexprs):
    """Compile `kernel` for sm_90; count its ld/st.global and atom instructions."""
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "base_ptr":
            signature[name] = ELEMENT[dtype]
        elif name.endswith("_ptr"):
            signature[name] = TABLE_POINTERS.get(name, "*fp32")
        elif name == "n_partials":
            signature[name] = "i32"
        else:
            signature[name] = "fp32"
        if name.endswith("_ptr"):  # what the launcher's specialisation gives torch tensors
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                    attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    return dict(Counter(re.findall(r"\b((?:ld|st)\.global\.[\w.]+|atom\.[\w.]+)", ptx)))


def adam(dtype, aligned, **flags):
    base = dict(NCOLS=8, CHUNK=65536, BLOCK=1024, ALIGNED=aligned, VEC=VEC[dtype], LR_TENSOR=False,
                BETA1_TENSOR=False, BETA2_TENSOR=False, HAS_INV_SCALE=True, HAS_CLIP=True,
                HAS_SKIP=True, HAS_WD=True, DECOUPLED=True, AMSGRAD=False, MAXIMIZE=False,
                HAS_MASTER=False)
    return ptx_ops(optim._adam_kernel, dtype, dict(base, **flags))


def sgd(dtype, aligned, **flags):
    base = dict(NCOLS=6, CHUNK=65536, BLOCK=1024, ALIGNED=aligned, VEC=VEC[dtype], LR_TENSOR=False,
                HAS_INV_SCALE=True, HAS_CLIP=True, HAS_SKIP=True, HAS_WD=True, HAS_MOMENTUM=True,
                NESTEROV=False, MAXIMIZE=False, HAS_MASTER=False)
    return ptx_ops(optim._sgd_kernel, dtype, dict(base, **flags))


def main():
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        get_ptxas(90).path
    except Exception as exc:  # noqa: BLE001  (any failure to find the toolchain)
        print(f"no ptxas: {exc}")
        sys.exit(3)
    ops = {
        "adam-fp32-aligned": adam("fp32", True),
        "adam-bf16-master-amsgrad-tensor-hyper-aligned": adam(
            "bf16", True, HAS_MASTER=True, AMSGRAD=True, LR_TENSOR=True, BETA1_TENSOR=True,
            BETA2_TENSOR=True, MAXIMIZE=True),
        "adam-fp16-l2-unaligned": adam("fp16", False, DECOUPLED=False, HAS_SKIP=False),
        "sgd-momentum-fp32-aligned": sgd("fp32", True, NESTEROV=True, LR_TENSOR=True),
        "sgd-momentum-bf16-master-unaligned": sgd("bf16", False, HAS_MASTER=True, MAXIMIZE=True),
        "sgd-plain-fp16-aligned": sgd("fp16", True, HAS_MOMENTUM=False, HAS_WD=False),
        "norm-bf16-aligned": ptx_ops(mt._norm_chunk_kernel, "bf16", dict(
            NCOLS=2, CHUNK=65536, BLOCK=1024, ALIGNED=True, VEC=8, HAS_INV_SCALE=True)),
        "norm-fp32-unaligned": ptx_ops(mt._norm_chunk_kernel, "fp32", dict(
            NCOLS=2, CHUNK=65536, BLOCK=1024, ALIGNED=False, VEC=4, HAS_INV_SCALE=False)),
        "norm-finish": ptx_ops(mt._norm_finish_kernel, "fp32", dict(BLOCK=1024)),
    }
    print(json.dumps(ops))


if __name__ == "__main__":
    main()
