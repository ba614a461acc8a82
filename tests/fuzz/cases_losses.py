"""The loss cases the fuzz worker runs (worker.py): each builds its tensors from a spec
(build.py), calls fusedopt's public API and returns the inputs it used and the results as
plain CPU tensors; the parent compares them with PyTorch (references.py)."""

from __future__ import annotations

import torch

import fusedopt as fo
from build import DTYPES, corrupt, generator, plain, tensor

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def class_target(spec: dict, shape, n_classes: int, ignore_index: int) -> torch.Tensor:
    gen = generator(spec["seed"] + 1)
    y = torch.randint(0, n_classes, shape, generator=gen)
    if spec.get("ignored_every"):
        y.view(-1)[::spec["ignored_every"]] = ignore_index
    if spec.get("bad_target") is not None and y.numel():
        y.view(-1)[0] = spec["bad_target"]
    dtype = DTYPES[spec.get("target_dtype", "int64")]
    return y.to(dtype) if dtype != torch.uint8 else y.clamp(0, 255).to(dtype)


def soft_target(spec: dict, shape, dtype) -> torch.Tensor:
    gen = generator(spec["seed"] + 2)
    logits = torch.randn(shape, generator=gen) * spec.get("target_sharpness", 1.0)
    q = torch.softmax(logits, dim=1 if len(shape) > 1 else 0)
    return q.to(dtype)


def class_vector(spec: dict, name: str, n_classes: int):
    kind = spec.get(name)
    if kind is None:
        return None
    gen = generator(spec["seed"] + 3)
    w = torch.rand(n_classes, generator=gen, dtype=torch.float64) + 0.25
    if kind == "with_zeros":
        w[::3] = 0.0
    return w.to(DTYPES[spec.get(name + "_dtype", "float32")])


def _inputs(spec: dict):
    """(leaf logits x, target, weight-like vector) of a class loss spec."""
    x = tensor(spec["input"], spec["seed"], requires_grad=spec.get("requires_grad", True))
    shape = tuple(x.shape)
    n_classes = shape[1] if len(shape) >= 2 else shape[0]
    class_shape = shape[:1] + shape[2:] if len(shape) >= 2 else ()
    if spec.get("soft"):
        target = soft_target(spec, shape, x.dtype)
    else:
        target = class_target(spec, class_shape, n_classes,
                              spec["kwargs"].get("ignore_index", -100))
    return x, target, n_classes


def _apply_corruption(spec: dict, tensors: dict) -> dict:
    bad = spec.get("corrupt")
    if bad:
        name, how = bad
        tensors[name] = corrupt(tensors[name], how)
    return tensors


def _run_loss(spec: dict, call):
    x, target, n_classes = _inputs(spec)
    vec = class_vector(spec, "weight", n_classes)
    inputs = {"x": plain(x), "target": plain(target), "weight": plain(vec)}
    args = _apply_corruption(spec, {"input": x, "target": target, "weight": vec})
    xin = args["input"]
    if spec.get("inplace_backward") and type(xin) is torch.Tensor and xin.requires_grad:
        xin = xin * 1.0  # the logits buffer the loss may overwrite (not the leaf)
    loss = call(xin, args["target"], args["weight"])
    grad = None
    if x.requires_grad and loss.requires_grad:
        gen = generator(spec["seed"] + 4)
        g_out = torch.randn(loss.shape, generator=gen).to(loss.dtype)
        (grad,) = torch.autograd.grad(loss, x, g_out)
        inputs["grad_output"] = plain(g_out)
    return dict(inputs, loss=plain(loss), grad=plain(grad))


@case
def cross_entropy(spec: dict):
    kw = spec["kwargs"]
    return _run_loss(spec, lambda x, y, w: fo.cross_entropy(
        x, y, w, inplace_backward=spec.get("inplace_backward", False), **kw))


@case
def focal_loss(spec: dict):
    kw = spec["kwargs"]
    return _run_loss(spec, lambda x, y, w: fo.focal_loss(x, y, alpha=w if w is not None else
                                                         kw.get("alpha"),
                                                         **{k: v for k, v in kw.items()
                                                            if k != "alpha"}))


@case
def sigmoid_focal_loss(spec: dict):
    kw = spec["kwargs"]
    x = tensor(spec["input"], spec["seed"], requires_grad=spec.get("requires_grad", True))
    gen = generator(spec["seed"] + 2)
    t = (torch.rand(x.shape, generator=gen) < 0.3).to(x.dtype)
    if spec.get("soft"):
        t = torch.rand(x.shape, generator=gen).to(x.dtype)
    inputs = {"x": plain(x), "target": plain(t)}
    args = _apply_corruption(spec, {"input": x, "target": t})
    loss = fo.sigmoid_focal_loss(args["input"], args["target"], **kw)
    grad = None
    if x.requires_grad and loss.requires_grad:
        g_out = torch.randn(loss.shape, generator=generator(spec["seed"] + 4)).to(loss.dtype)
        (grad,) = torch.autograd.grad(loss, x, g_out)
        inputs["grad_output"] = plain(g_out)
    return dict(inputs, loss=plain(loss), grad=plain(grad))


def _world_of_one():
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return dist.group.WORLD


@case
def vocab_parallel_public(spec: dict):
    """fo.vocab_parallel_cross_entropy in a process group of one rank (the full vocabulary
    on this rank)."""
    group = _world_of_one()
    kw = spec["kwargs"]
    return _run_loss(spec, lambda x, y, w: fo.vocab_parallel_cross_entropy(
        x, y, group, w, inplace_backward=spec.get("inplace_backward", False), **kw))


@case
def vocab_parallel_shards(spec: dict):
    """The vocab-parallel entry points of one backend on emulated shards (the two
    all-reduces replaced by their results), combined by the ops layer: row losses of each
    shard and the gradient columns."""
    from fusedopt import backends
    from vocab_parallel_emulation import emulate

    impl = backends.get(spec["backend"])
    x = tensor(spec["input"], spec["seed"]).detach()
    n_rows, n_classes = x.shape
    soft = spec.get("soft", False)
    kw = spec["kwargs"]
    ignore = kw.get("ignore_index", -100)
    y = soft_target(spec, x.shape, x.dtype) if soft else class_target(spec, (n_rows,), n_classes,
                                                                       ignore)
    w = class_vector(spec, "weight", n_classes)
    bounds = [0] + sorted(min(b, n_classes) for b in spec["bounds"]) + [n_classes]
    losses, grad = emulate(impl, x, y, None if w is None else w.float().contiguous(), bounds,
                           label_smoothing=kw.get("label_smoothing", 0.0),
                           z_loss=kw.get("z_loss", 0.0), softcap=kw.get("softcap"), soft=soft,
                           ignore_index=ignore)
    return {"x": plain(x), "target": plain(y), "weight": plain(w),
            "losses": [plain(loss) for loss in losses], "grad": plain(grad)}
