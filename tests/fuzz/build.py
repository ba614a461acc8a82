"""Tensors from fuzz specs, built the same way every time (seeded generators): values
(normal, offset by a large constant, huge, tiny, with -inf/inf/NaN placed), dtypes and
layouts (contiguous, transposed, strided rows or columns, zero-stride expanded,
channels_last, a view of a storage freed or shrunk later, tensor subclasses).

A spec is plain data (see strategies.py): hypothesis draws it in the parent, the worker
builds the tensors from it."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64, "int64": torch.int64, "int32": torch.int32,
          "uint8": torch.uint8, "int16": torch.int16}
SPECIALS = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan"), "max": None}


class Tagged(torch.Tensor):
    """A __torch_function__ subclass (shares its storage; fusedopt's kernels refuse it)."""


class Wrapper(torch.Tensor):
    """A __torch_dispatch__ wrapper subclass, like DTensor: its data_ptr() is not its data."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype,
                                                   device=inner.device,
                                                   requires_grad=inner.requires_grad)

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrap(t):
            return t.inner if isinstance(t, Wrapper) else t
        return func(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in (kwargs or {}).items()})


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def values(shape, kind: str, scale: float, offset: float, specials, seed: int) -> torch.Tensor:
    """fp64 values of `shape`: `kind` normal/uniform/equal/integers, times `scale`, plus
    `offset`; `specials` is a tuple of (position in the flat tensor, name in SPECIALS)."""
    gen = generator(seed)
    n = 1
    for s in shape:
        n *= s
    if kind == "uniform":
        flat = torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1
    elif kind == "equal":
        flat = torch.ones(n, dtype=torch.float64)
    elif kind == "integers":
        flat = torch.randint(-3, 4, (n,), generator=gen).double()
    else:
        flat = torch.randn(n, generator=gen, dtype=torch.float64)
    flat = flat * scale + offset
    for pos, name in specials:
        if n:
            flat[pos % n] = SPECIALS[name] if SPECIALS[name] is not None else 3.0e38
    return flat.reshape(shape)


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of `t` in another memory layout (same values, as a view of a bigger or
    permuted storage); 'expanded' repeats the first row (other values)."""
    if layout == "contiguous" or t.dim() == 0:
        return t.contiguous()
    if layout == "transposed":  # reversed dim order in memory
        perm = list(range(t.dim()))[::-1]
        return t.permute(perm).contiguous().permute(perm)
    if layout == "row_strided":
        big = torch.zeros((t.shape[0], t.shape[-1] + 3) if t.dim() == 2 else
                          (t.shape[0] * 2,) + tuple(t.shape[1:]), dtype=t.dtype)
        if t.dim() == 2:
            big[:, :t.shape[1]] = t
            return big[:, :t.shape[1]]
        big[::2] = t
        return big[::2]
    if layout == "col_strided" and t.dim() >= 2:
        big = torch.zeros(t.shape[:1] + (t.shape[1] * 2,) + tuple(t.shape[2:]), dtype=t.dtype)
        big[:, ::2] = t
        return big[:, ::2]
    if layout == "expanded" and t.shape[0] > 0:
        return t[:1].expand(t.shape)
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "offset":  # a view that does not start at its storage's start
        big = torch.zeros(t.numel() + 5, dtype=t.dtype)
        big[5:] = t.reshape(-1)
        return big[5:].view(t.shape)
    return t.contiguous()


def tensor(spec: dict, seed: int, requires_grad: bool = False) -> torch.Tensor:
    """A float tensor from a value spec: shape, dtype, kind, scale, offset, specials,
    layout."""
    v = values(tuple(spec["shape"]), spec.get("kind", "normal"), spec.get("scale", 1.0),
               spec.get("offset", 0.0), spec.get("specials", ()), seed)
    t = laid_out(v.to(DTYPES[spec.get("dtype", "float32")]), spec.get("layout", "contiguous"))
    return t.detach().requires_grad_(requires_grad)


def plain(t):
    """A plain contiguous CPU copy (what the worker sends back); None stays None."""
    if t is None:
        return None
    if type(t) is not torch.Tensor:
        t = torch.Tensor._make_subclass(torch.Tensor, t.detach()) if not isinstance(t, Wrapper) \
            else t.inner
    return t.detach().clone().contiguous()


def corrupt(t: torch.Tensor, how: str):
    """`t` made unfit for a kernel (or the same values in a form fusedopt may refuse):
    freed / shrunk storage, a subclass, a meta copy, a lazily negated view."""
    if how == "freed":  # as FSDP frees a parameter's memory: the view's storage has 0 bytes
        big = torch.zeros(t.numel() + 4, dtype=t.dtype)
        view = big[4:].view(t.shape)
        view.copy_(t)
        big.untyped_storage().resize_(0)
        return view
    if how == "shrunk":
        big = torch.zeros(t.numel() + 8, dtype=t.dtype)
        view = big[8:].view(t.shape)
        view.copy_(t)
        big.untyped_storage().resize_(max(0, (t.numel() // 2) * t.element_size()))
        return view
    if how == "tagged":
        return t.detach().as_subclass(Tagged)
    if how == "wrapper":
        return Wrapper(t.detach())
    if how == "meta":
        return t.detach().to("meta")
    if how == "negated":
        return torch._neg_view(t.detach())
    raise ValueError(how)
