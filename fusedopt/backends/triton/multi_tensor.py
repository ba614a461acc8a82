"""Multi-tensor launches for the Triton optimizer kernels: device-side tables, the chunk
planner, and the gradient norm / inf-NaN pass.

Tables.  A bucket (tensors of one device and dtype) is described by int64 device tensors:
  - `static`  (n, 2 + k): per tensor [numel, n_chunks, offset of column 0 .. k-1], where a
    column is a list such as params, exp_avgs or steps (offset 0 for an absent column);
  - `grads`   (n,): gradient offsets, the only table refreshed per step;
  - `chunks`  (c, 2): per chunk [tensor index within its batch, first element];
  - `counters` (n,) int32 zeros: arrival counters of the optimizer kernels (optim.py).
An offset is the tensor's data_ptr() minus the address of a small `base` tensor of the same
dtype owned by the tables, in elements: the kernel forms `base_ptr + offset`, a typed
pointer whose alignment Triton can reason about (a raw int64 address cast to a pointer
loses it).  When every address of a launch is 16-byte aligned (checked on the host) the
offsets are declared multiples of 16 bytes and the full blocks of a chunk -- loaded without
a mask; only the last block of a chunk is masked -- use 16-byte loads and stores.
Every tensor gets ceil(numel / CHUNK_SIZE) chunks, at least one (a 0-element tensor still
owns a chunk, whose program updates its step counter).  Tensors are cut into batches of at
most MAX_TENSORS consecutive tensors; one launch covers one batch, one program one chunk,
so the number of launches does not grow with the number of tensors of a batch.

Caching.  The tables are built once and kept in the `cache` dict the optimizer owns for the
bucket.  Every call first goes through the kernel boundary (fusedopt/backends/
_optim_boundary.py), which verifies the tensors and hands back their addresses and numels;
the key -- those addresses and numels, the dtype and device, CHUNK_SIZE and MAX_TENSORS --
is compared with the tables' (the same tuple objects when nothing changed, no device
access): any change of storage rebuilds the tables.  The
gradient table is rewritten (one small host-to-device copy) only when a gradient address
changed since the previous call, so with gradients in fixed storage a step makes no copy
at all and can be captured in a CUDA graph.

Norm pass (`multi_tensor_norm`), for gradients g and inv_scale s:
    chunk kernel:  partial[c] = [sum over the chunk of (g*s)^2 (fp32), any g inf/NaN]
    finish kernel: out = [sum of partial sums, max of flags], one program, fixed order
No atomics, so the result is bitwise reproducible.  Traffic: reads n*b (b bytes per
gradient element) + 16 bytes per chunk, writes 8 bytes per chunk + 8.  Launches: one per
batch + one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedopt.backends import _optim_boundary as boundary
from fusedopt.backends.triton._interpreter import loop_bound
from fusedopt.backends.triton.cross_entropy import _cast_for

# Elements per chunk (one program), tensors per launch, elements per loop iteration.
# Tests lower them to exercise several chunks and several batches on small tensors.
CHUNK_SIZE = 65536
MAX_TENSORS = 4096
BLOCK_SIZE = 1024

# columns of the static table (constexpr: read inside the kernels)
COL_NUMEL = tl.constexpr(0)
COL_NCHUNKS = tl.constexpr(1)

# full blocks use accesses of this many bytes when every address of a launch is aligned to it
VECTOR_BYTES = 16


class Batch:
    """The tensors [t0, t1) and chunks [c0, c1) of one launch, with its table views."""

    __slots__ = ("t0", "t1", "c0", "c1", "static", "grads", "chunks", "counters")

    def __init__(self, tables, t0, t1, c0, c1):
        self.t0, self.t1, self.c0, self.c1 = t0, t1, c0, c1
        self.static = tables.static[t0:t1]
        self.grads = tables.grads[t0:t1]
        self.chunks = tables.chunks[c0:c1]
        self.counters = tables.counters[t0:t1]

    @property
    def n_chunks(self) -> int:
        return self.c1 - self.c0


def _offsets(tensors, base_address: int, itemsize: int) -> list[int]:
    """Element offsets of the tensors' data from `base_address` (tensors of one dtype)."""
    out = []
    for t in tensors:
        delta = t.data_ptr() - base_address
        if delta % itemsize:
            raise ValueError(f"a tensor of dtype {t.dtype} starts at address {t.data_ptr():#x}, "
                             f"not a multiple of its element size {itemsize}")
        out.append(delta // itemsize)
    return out


def _aligned(addresses) -> bool:
    return all(a % VECTOR_BYTES == 0 for a in addresses)


class Tables:
    """The device tables of one bucket (see the module docstring)."""

    def __init__(self, key, vector_columns, scalar_columns, grads, chunk_size, max_tensors):
        if chunk_size < 1 or chunk_size & (chunk_size - 1):
            raise ValueError(f"CHUNK_SIZE must be a power of two, got {chunk_size}")
        self.key = key
        self.chunk_size = chunk_size
        self.n_tensors = n = len(grads)
        device, dtype = grads[0].device, grads[0].dtype
        # one small allocation per dtype: the origin of the element offsets in the tables
        self.base_f32 = torch.empty(VECTOR_BYTES, dtype=torch.float32, device=device)
        self.base = (self.base_f32 if dtype == torch.float32
                     else torch.empty(VECTOR_BYTES, dtype=dtype, device=device))
        numel_t = torch.tensor(key[2], dtype=torch.int64)
        n_chunks = ((numel_t + chunk_size - 1) // chunk_size).clamp_min(1)
        rows = [numel_t, n_chunks]
        self.static_aligned = _aligned((self.base.data_ptr(), self.base_f32.data_ptr()))
        for i, column in enumerate(vector_columns + scalar_columns):
            if column is None:
                rows.append(torch.zeros(n, dtype=torch.int64))
                continue
            base = self.base_f32 if column[0].dtype == torch.float32 else self.base
            rows.append(torch.tensor(_offsets(column, base.data_ptr(), base.element_size()),
                                     dtype=torch.int64))
            if i < len(vector_columns):
                self.static_aligned &= _aligned(t.data_ptr() for t in column)
        self.static = torch.stack(rows, dim=1).to(device, non_blocking=True)
        self.n_cols = len(rows)

        # chunk c of tensor i starts at element c*chunk_size; its index is local to the batch
        ends = torch.cumsum(n_chunks, 0)
        firsts = ends - n_chunks
        owner = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), n_chunks)
        starts = (torch.arange(int(ends[-1]), dtype=torch.int64) - firsts[owner]) * chunk_size
        self.chunks = torch.stack([owner % max_tensors, starts], dim=1)
        self.chunks = self.chunks.to(device, non_blocking=True)
        self.n_chunks_total = int(ends[-1])

        self.counters = torch.zeros(n, dtype=torch.int32, device=device)
        self.grads = torch.zeros(n, dtype=torch.int64, device=device)
        self.grad_ptrs: tuple = ()
        self.grads_aligned = False
        firsts_l, ends_l = firsts.tolist(), ends.tolist()
        self.batches = [Batch(self, t0, min(t0 + max_tensors, n), firsts_l[t0],
                              ends_l[min(t0 + max_tensors, n) - 1])
                        for t0 in range(0, n, max_tensors)]
        self.scratch: torch.Tensor | None = None

    @property
    def aligned(self) -> bool:
        """Every vector address is 16-byte aligned: full blocks may use 16-byte accesses."""
        return self.static_aligned and self.grads_aligned

    def set_grads(self, grads, ptrs) -> None:
        """Point the gradient table at `grads`, whose addresses are `ptrs` (a host-to-device
        copy only if they moved)."""
        ptrs = tuple(ptrs)
        if ptrs != self.grad_ptrs:
            offsets = _offsets(grads, self.base.data_ptr(), self.base.element_size())
            self.grads.copy_(torch.tensor(offsets, dtype=torch.int64), non_blocking=True)
            self.grad_ptrs = ptrs
            self.grads_aligned = _aligned(ptrs)


def tables_for(cache: dict, name: str, grads, vector_columns=(), scalar_columns=(), *,
               verified) -> Tables:
    """The tables of `name` ("norm", "adam", "sgd") in `cache`, rebuilt if any storage changed,
    with the gradient table pointing at `grads`.  A column is a list of tensors (one per
    gradient) or None; vector columns hold numel elements each, scalar columns one.
    `verified`: (numels, addresses of every list, gradient addresses) from the kernel
    boundary (fusedopt/backends/_optim_boundary.py), which checked every tensor first."""
    vector_columns, scalar_columns = tuple(vector_columns), tuple(scalar_columns)
    numels, ptr_key, grad_ptrs = verified
    key = (CHUNK_SIZE, MAX_TENSORS, numels, ptr_key, grads[0].dtype, grads[0].device,
           tuple(col is None for col in vector_columns + scalar_columns))
    tables = cache.get(name)
    if tables is None or tables.key != key:
        tables = Tables(key, vector_columns, scalar_columns, grads, CHUNK_SIZE, MAX_TENSORS)
        cache[name] = tables
    tables.set_grads(grads, grad_ptrs)
    return tables


def launch_options(tables: Tables, dtype: torch.dtype) -> dict:
    """The constexprs every multi-tensor kernel takes."""
    return dict(NCOLS=tables.n_cols, CHUNK=tables.chunk_size,
                BLOCK=min(BLOCK_SIZE, tables.chunk_size), ALIGNED=tables.aligned,
                VEC=VECTOR_BYTES // dtype.itemsize)


@triton.jit
def chunk_bounds(chunk_table_ptr, static_ptr, NCOLS: tl.constexpr, CHUNK: tl.constexpr,
                 BLOCK: tl.constexpr):
    """(tensor row in the batch, pointer to its static row, first element, number of full
    blocks, end element) of this program's chunk."""
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(chunk_table_ptr + 2 * pid)
    start = tl.multiple_of(tl.load(chunk_table_ptr + 2 * pid + 1), CHUNK)
    entry = static_ptr + row * NCOLS
    end = tl.minimum(start + CHUNK, tl.load(entry + COL_NUMEL))
    return row, entry, start, (end - start) // BLOCK, end


@triton.jit
def vector_ptr(offset_ptr, base, ALIGNED: tl.constexpr, VEC: tl.constexpr):
    """base + the element offset stored at offset_ptr (a multiple of VEC when ALIGNED)."""
    offset = tl.load(offset_ptr)
    if ALIGNED:
        offset = tl.multiple_of(offset, VEC)
    return base + offset


@triton.jit
def load(ptr, idx, end, MASKED: tl.constexpr):
    """ptr[idx] as fp32; only the tail block of a chunk needs the mask idx < end."""
    if MASKED:
        value = tl.load(ptr + idx, mask=idx < end, other=0.0)
    else:
        value = tl.load(ptr + idx)
    return value.to(tl.float32)


@triton.jit
def store(ptr, idx, end, value, MASKED: tl.constexpr):
    """ptr[idx] = value, rounded once (to nearest even) to the pointer's dtype."""
    value = _cast_for(value, ptr)
    if MASKED:
        tl.store(ptr + idx, value, mask=idx < end)
    else:
        tl.store(ptr + idx, value)


@triton.jit
def is_nonfinite(x):
    """inf or NaN: an fp32 value whose exponent bits are all ones."""
    return (x.to(tl.uint32, bitcast=True) & 0x7F800000) == 0x7F800000


@triton.jit
def _norm_block(g_ptr, idx, end, inv_scale, sumsq, bad, HAS_INV_SCALE: tl.constexpr,
                MASKED: tl.constexpr):
    g = load(g_ptr, idx, end, MASKED)
    bad = tl.maximum(bad, is_nonfinite(g).to(tl.int32))
    if HAS_INV_SCALE:
        g = g * inv_scale
    return sumsq + g * g, bad


@triton.jit
def _norm_chunk_kernel(static_ptr, grad_table_ptr, chunk_table_ptr, partial_ptr, inv_scale_ptr,
                       base_ptr, NCOLS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                       ALIGNED: tl.constexpr, VEC: tl.constexpr, HAS_INV_SCALE: tl.constexpr):
    row, entry, start, n_full, end = chunk_bounds(chunk_table_ptr, static_ptr, NCOLS, CHUNK, BLOCK)
    g_ptr = vector_ptr(grad_table_ptr + row, base_ptr, ALIGNED, VEC)
    inv_scale = 1.0
    if HAS_INV_SCALE:
        inv_scale = tl.load(inv_scale_ptr)
    sumsq = tl.zeros([BLOCK], tl.float32)
    bad = tl.zeros([BLOCK], tl.int32)
    for i in range(0, loop_bound(n_full)):
        idx = start + i * BLOCK + tl.arange(0, BLOCK)
        sumsq, bad = _norm_block(g_ptr, idx, end, inv_scale, sumsq, bad, HAS_INV_SCALE, False)
    tail = start + n_full * BLOCK
    if tail < end:
        sumsq, bad = _norm_block(g_ptr, tail + tl.arange(0, BLOCK), end, inv_scale, sumsq, bad,
                                 HAS_INV_SCALE, True)
    pid = tl.program_id(0).to(tl.int64)
    tl.store(partial_ptr + 2 * pid, tl.sum(sumsq, axis=0))
    tl.store(partial_ptr + 2 * pid + 1, tl.max(bad, axis=0).to(tl.float32))


@triton.jit
def _norm_finish_kernel(partial_ptr, n_partials, out_ptr, BLOCK: tl.constexpr):
    sumsq = tl.zeros([BLOCK], tl.float32)
    bad = tl.zeros([BLOCK], tl.float32)
    for off in range(0, loop_bound(n_partials), BLOCK):
        idx = off + tl.arange(0, BLOCK)
        mask = idx < n_partials
        sumsq += tl.load(partial_ptr + 2 * idx, mask=mask, other=0.0)
        bad = tl.maximum(bad, tl.load(partial_ptr + 2 * idx + 1, mask=mask, other=0.0))
    tl.store(out_ptr, tl.sum(sumsq, axis=0))
    tl.store(out_ptr + 1, tl.max(bad, axis=0))


def multi_tensor_norm(tensors, inv_scale, cache):
    """``[Σ (g·inv_scale)², nonfinite]`` as an fp32 (2,) tensor (contract:
    docs/architecture.md); two launches for one batch, bitwise reproducible."""
    numels, ptrs = boundary.verify_norm(cache, tensors, device_types=("cuda", "cpu"))
    tables = tables_for(cache, "norm", tensors, verified=(numels, (), ptrs))
    if tables.scratch is None:
        tables.scratch = torch.empty(2 * tables.n_chunks_total, dtype=torch.float32,
                                     device=tables.static.device)
    partials = tables.scratch
    options = launch_options(tables, tensors[0].dtype)
    for batch in tables.batches:
        _norm_chunk_kernel[(batch.n_chunks,)](
            batch.static, batch.grads, batch.chunks, partials[2 * batch.c0:],
            inv_scale if inv_scale is not None else partials, tables.base,
            HAS_INV_SCALE=inv_scale is not None, **options)
    out = torch.empty(2, dtype=torch.float32, device=partials.device)
    _norm_finish_kernel[(1,)](partials, tables.n_chunks_total, out, BLOCK=1024)
    return out
