"""Runs every CPU kernel of the built ``fusedopt._cpu`` with one ISA clone forced, and
prints a hash of all the output bits (run by tests/backends/test_cpu_isas.py, one
subprocess per clone):

    python tests/backends/isa_clone_run.py CLONE [CLONE ...]

with CLONE one of native, default, arch_x86_64_v3, arch_x86_64_v4.

The build compiles each inner loop three times (``target_clones``: x86-64-v4, x86-64-v3 and
the baseline ``default``) and the dynamic loader picks one per function at load time, from
the CPU's features, through an IRELATIVE relocation.  To run another clone of the *same
binary*, this script reads the ELF symbol table of the extension, finds the GOT slot each
IRELATIVE relocation filled and overwrites it with the address of the requested clone
(``<function>.<clone>``); ``native`` (first, if asked) leaves the loader's choice.  For
each clone it prints ``CLONE slots N changed M optimizers HASH losses HASH``."""

from __future__ import annotations

import ctypes
import hashlib
import os
import struct
import sys

import torch

from fusedopt import _cpu
from fusedopt.backends.cpu import lean, losses, optim, vocab_parallel

_R_X86_64_IRELATIVE, _SHT_SYMTAB, _SHT_RELA, _PT_GNU_RELRO = 37, 2, 4, 0x6474E552


def _elf(path):
    """(IRELATIVE (offset, addend) pairs, {symbol name: value}, RELRO (vaddr, size))."""
    data = open(path, "rb").read()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    symbols, irelative = {}, []
    for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
        if sh_type == _SHT_SYMTAB:
            strtab = sections[link]
            for k in range(size // entsize):
                name_off, _, _, _, value, _ = struct.unpack_from("<IBBHQQ", data, offset + k * entsize)
                start = strtab[4] + name_off
                symbols[data[start:data.index(b"\0", start)].decode()] = value
        elif sh_type == _SHT_RELA:
            for k in range(size // entsize):
                r_offset, r_info, r_addend = struct.unpack_from("<QQq", data, offset + k * entsize)
                if r_info & 0xFFFFFFFF == _R_X86_64_IRELATIVE:
                    irelative.append((r_offset, r_addend))
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    relro = (0, 0)
    for i in range(phnum):
        p_type, _, _, vaddr, _, _, memsz, _ = struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == _PT_GNU_RELRO:
            relro = (vaddr, memsz)
    return irelative, symbols, relro


def _load_base(path) -> int:
    real = os.path.realpath(path)
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and os.path.realpath(fields[5]) == real and int(fields[2], 16) == 0:
                return int(fields[0].split("-")[0], 16)
    raise RuntimeError(f"{path} is not mapped")


def force_clone(clone: str) -> tuple[int, int]:
    """Point every ifunc slot of fusedopt._cpu at ``<function>.<clone>``; (set, changed)."""
    path = _cpu.__file__
    irelative, symbols, (relro, relro_size) = _elf(path)
    by_value = {}
    for name, value in symbols.items():
        if name.endswith(".resolver"):
            by_value[value] = name[: -len(".resolver")]
    base = _load_base(path)
    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    if relro_size:  # the slots may lie in the read-only-after-relocation part
        start = (base + relro) // page * page
        libc.mprotect(ctypes.c_void_p(start), ctypes.c_size_t(base + relro + relro_size - start), 3)
    changed = 0
    for offset, addend in irelative:
        function = by_value[addend]  # KeyError: an ifunc that is not a target_clones function
        slot = ctypes.c_uint64.from_address(base + offset)
        target = base + symbols[f"{function}.{clone}"]
        changed += slot.value != target
        slot.value = target
    return len(irelative), changed


def _digest(h, *tensors):
    for t in tensors:
        if t is not None:
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def run_optimizers(h):
    shapes = [(70_001,), (1031,), (7, 13), (0,), (3,)]
    gen = torch.Generator().manual_seed(0)
    rand = lambda dtype, scale=1.0: [(torch.randn(s, generator=gen) * scale).to(dtype)  # noqa: E731
                                     for s in shapes]
    f32 = torch.float32
    scalar = lambda v: torch.tensor(v, dtype=f32)  # noqa: E731
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        grads = [rand(dtype) for _ in range(3)]
        grads[1][0][123] = float("inf")
        for inv in (None, scalar(0.5)):
            _digest(h, optim.multi_tensor_norm(grads[0], inv, {}), optim.multi_tensor_norm(grads[1], inv, {}))
        for decoupled, amsgrad, master, maximize in [(True, False, False, False), (False, True, True, True),
                                                     (True, True, True, False), (False, False, False, True)]:
            params = rand(dtype)
            states = [[torch.zeros(s, dtype=f32) for s in shapes] for _ in range(3)]
            masters = [p.float() for p in params] if master and dtype != f32 else None
            steps = [torch.zeros((), dtype=f32) for _ in shapes]
            for k in (0, 2):
                optim.adam_step(params, grads[k], states[0], states[1], states[2] if amsgrad else None,
                                masters, steps, lr=scalar(1e-2) if k else 3e-3, beta1=0.9,
                                beta2=scalar(0.99), eps=1e-8, weight_decay=0.1, amsgrad=amsgrad,
                                maximize=maximize, decoupled=decoupled,
                                inv_scale=scalar(0.5) if k else None,
                                clip_coef=scalar(0.75) if decoupled else None, skip=scalar(0.0),
                                cache={})
            _digest(h, *params, *states[0], *states[1], *states[2], *(masters or []), *steps)
        for momentum, dampening, nesterov in [(0.0, 0.0, False), (0.9, 0.0, True), (0.9, 0.3, False)]:
            params = rand(dtype)
            buffers = [torch.zeros(s, dtype=f32) for s in shapes] if momentum else None
            flags = [torch.zeros((), dtype=f32) for _ in shapes]
            for k in (0, 2):
                optim.sgd_step(params, grads[k], buffers, None, flags, lr=0.05, momentum=momentum,
                               dampening=dampening, weight_decay=0.01, nesterov=nesterov,
                               maximize=nesterov, inv_scale=scalar(0.25), clip_coef=None,
                               skip=None, cache={})
            _digest(h, *params, *(buffers or []), *flags)
    run_lean(h, shapes, rand, scalar)


def run_lean(h, shapes, rand, scalar):
    """The lean Adam kernel (bf16 / 8-bit moments, stochastic rounding), its portable loops
    forced (the AVX-512 ones are not clones: they run whenever the CPU has AVX-512)."""
    f32 = torch.float32
    _cpu.set_portable_lean_blocks(True)
    try:
        for dtype, state, master in [(torch.float32, "int8", False), (torch.bfloat16, "bf16", False),
                                     (torch.float16, "int8", False), (torch.bfloat16, "f32", False),
                                     (torch.bfloat16, "int8", True)]:
            params = rand(dtype)
            if state == "int8":
                m = [torch.zeros(s, dtype=torch.int8) for s in shapes]
                v = [torch.zeros(s, dtype=torch.uint8) for s in shapes]
                absmax = [[torch.zeros(-(-p.numel() // 256)) for p in params] for _ in range(2)]
            else:
                sd = torch.bfloat16 if state == "bf16" else f32
                m, v = ([torch.zeros(s, dtype=sd) for s in shapes] for _ in range(2))
                absmax = [None, None]
            masters = [p.float() for p in params] if master else None
            steps = [torch.zeros((), dtype=f32) for _ in shapes]
            for k in range(2):
                lean.lean_adam_step(params, rand(dtype), m, v, *absmax, masters, steps,
                                    list(range(len(shapes))), lr=scalar(1e-2) if k else 3e-3,
                                    beta1=0.9, beta2=scalar(0.99), eps=1e-8, weight_decay=0.1,
                                    maximize=bool(k), decoupled=not master,
                                    stochastic_rounding=True, seed=77,
                                    inv_scale=scalar(0.5) if k else None, clip_coef=None,
                                    skip=scalar(0.0), cache={})
            _digest(h, *params, *m, *v, *(absmax[0] or []), *(absmax[1] or []),
                    *(masters or []), *steps)
    finally:
        _cpu.set_portable_lean_blocks(False)


def run_losses(h):
    gen = torch.Generator().manual_seed(1)
    n, c = 37, 1031
    base = (torch.rand(n, c, generator=gen) - 0.5) * 24
    base[0, 5], base[1, 7], base[2, 9] = -float("inf"), 1e4, -1e4
    target = torch.randint(0, c, (n,), generator=gen)
    target[3] = -100
    weight = torch.rand(c, generator=gen) + 0.5
    scales = torch.tensor([0.37, 1.3])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = base.to(dtype)
        soft = torch.softmax(torch.randn(n, c, generator=gen), 1).to(dtype)
        for w in (None, weight):
            for smoothing, softcap in [(0.0, None), (0.1, 7.0)]:
                for tgt, is_soft in [(target, False), (soft, True)]:
                    _digest(h, *losses.cross_entropy_fwd(
                        x, tgt, w, scales, ignore_index=-100, label_smoothing=smoothing,
                        z_loss=1e-3, softcap=softcap, soft_target=is_soft, inplace=False,
                        need_grad=True))
            for gamma in (0.0, 2.0):
                _digest(h, *losses.focal_loss_fwd(x, target, w, scales, gamma=gamma,
                                                  ignore_index=-100, label_smoothing=0.1,
                                                  need_grad=True))
            for tgt, is_soft in [(target, False), (soft, True)]:  # one rank's columns
                lo, hi = 300, 1000
                shard = dict(class_offset=lo, num_classes=c, ignore_index=-100,
                             label_smoothing=0.1, softcap=7.0, soft_target=is_soft)
                local = tgt[:, lo:hi] if is_soft else tgt
                local_w = None if w is None else w[lo:hi]
                stats = vocab_parallel.vocab_parallel_row_stats(x[:, lo:hi], local, local_w,
                                                                **shard)
                coefs = torch.rand(n, 5, generator=gen)
                coefs[:, 0] = stats[:, 0]
                _digest(h, stats, vocab_parallel.vocab_parallel_grad(
                    x[:, lo:hi], local, local_w, coefs, inplace=False, **shard))
        probs = torch.rand(n, c, generator=gen).to(dtype)
        for reduce in (False, True):
            _digest(h, *losses.sigmoid_focal_loss_fwd(x.contiguous(), probs, scales, alpha=0.25,
                                                      gamma=1.5, label_smoothing=0.05,
                                                      reduce=reduce, need_grad=True))


def main(clones) -> None:
    for clone in clones:
        slots, changed = force_clone(clone) if clone != "native" else (0, 0)
        hashes = []
        for run in (run_optimizers, run_losses):
            h = hashlib.sha256()
            run(h)
            hashes.append(h.hexdigest())
        print(f"{clone} slots {slots} changed {changed} optimizers {hashes[0]} losses {hashes[1]}",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
