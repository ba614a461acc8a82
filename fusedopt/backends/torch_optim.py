"""Pure-PyTorch optimizer entry points of the `torch` backend (contracts: docs/architecture.md).

The math runs on whole lists with ``torch._foreach_*`` ops (no Python loop per tensor for
the arithmetic) in fp32 for fp32/bf16/fp16 params, and never reads a device value on the
host.  This is also the backend of the params the compiled kernels do not take, trained as
torch trains them: fp64 params in fp64 with fp64 states, complex params through their real
views (``view_as_real``) with complex states.

Skipped steps.  The skip flag is a 0-dim device tensor, so the host cannot branch on it.
Every new value (params, masters, moments, steps, momentum flags) is therefore computed out
of place first and then committed with ``torch.where(skip > 0, old, new)``, one select per
tensor.  A select (not a blend such as ``old + 0 * (new - old)``) is what keeps a skipped
step bit-exact: with inf/NaN gradients ``new`` holds inf/NaN and ``0 * inf`` is NaN.
When there is no skip flag the new values are copied in with ``torch._foreach_copy_``.

Memory traffic (n = elements of the bucket, fp32 states): the norm reads g once; the Adam
step reads g, p, m, v (+ max_v, master) and, because the new values are built out of
place, writes temporaries of the same size before copying them in -- about twice the
traffic of a fused kernel.  This backend is the readable fallback, not the fast path.
"""

from __future__ import annotations

import torch

__all__ = ["OPS", "multi_tensor_norm", "adam_step", "sgd_step"]

OPS: frozenset[str] = frozenset({"adam", "sgd"})

_F32 = torch.float32


def _math_dtype(dtype):
    """fp32 for the kernel dtypes, fp64 for fp64 params (complex ones: their real views')."""
    return _F32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _real(tensors):
    """A list of complex tensors as their real views (``view_as_real``: each element a
    (re, im) pair), the way torch's optimizers step complex params; other lists as given."""
    if tensors and tensors[0].is_complex():
        return [torch.view_as_real(t) for t in tensors]
    return tensors


def multi_tensor_norm(tensors, inv_scale, cache):
    """``[Σ (g·inv_scale)², nonfinite]`` as a (2,) tensor on the tensors' device: fp32, or
    fp64 for fp64 / complex128 tensors (as torch's ``clip_grad_norm_`` keeps their norm).

    The per-tensor norms are taken in float64: a finite fp32/bf16/fp16 value squared cannot
    overflow there, so the sum is non-finite exactly when some element is inf/NaN, and one
    pass gives both the norm and the inf/NaN flag.  Squares of fp64 values can overflow, so
    their flag comes from the largest magnitudes instead.
    """
    tensors = _real(tensors)
    wide = tensors[0].dtype == torch.float64
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float64)
    sumsq = torch.stack(norms).square().sum()
    if wide:
        nonfinite = (~torch.isfinite(torch.stack(torch._foreach_norm(tensors, float("inf"))))
                     ).any().to(_F32)
    else:
        nonfinite = (~torch.isfinite(sumsq)).to(_F32)
    if inv_scale is not None:
        inv = inv_scale.to(torch.float64)
        sumsq = sumsq * (inv * inv)
    if wide:
        return torch.stack([sumsq, nonfinite.to(torch.float64)])
    return torch.stack([sumsq.to(_F32), nonfinite])


def _math_grads(grads, dtype, inv_scale, clip_coef, maximize):
    """The gradient used by the update, ``((g·inv_scale)·clip_coef)``, negated when maximize,
    in the math dtype ``dtype`` (fp32, or fp64 for fp64 params).

    Returns new tensors, or the caller's grads themselves when nothing changes them (they
    are never written to).
    """
    out = [g if g.dtype == dtype else g.to(dtype) for g in grads]
    if inv_scale is not None:
        out = torch._foreach_mul(out, inv_scale)
    if clip_coef is not None:
        out = torch._foreach_mul(out, clip_coef)
    if maximize:
        out = torch._foreach_neg(out)
    return out


def _math_values(params, master_params, dtype):
    if master_params is not None:
        return master_params
    return [p if p.dtype == dtype else p.to(dtype) for p in params]


def _commit(targets, news, keep):
    """Write ``news`` into ``targets``; where ``keep`` (0-dim bool) is true, keep the old bits."""
    if keep is None:
        torch._foreach_copy_(targets, news)
        return
    for old, new in zip(targets, news):
        torch.where(keep, old, new, out=new)
    torch._foreach_copy_(targets, news)


def _commit_scalars(targets, new_stacked, keep):
    """Like `_commit` for a list of 0-dim tensors whose new values are stacked in one 1-D tensor."""
    if keep is not None:
        new_stacked = torch.where(keep, torch.stack(targets), new_stacked)
    torch._foreach_copy_(targets, list(new_stacked.unbind(0)))


def _commit_params(params, master_params, new_values, keep):
    """Commit fp32 ``new_values`` to the masters (when present) and, cast, to the params."""
    if master_params is not None:
        _commit(master_params, new_values, keep)
    _commit(params, [v if v.dtype == p.dtype else v.to(p.dtype)
                     for p, v in zip(params, new_values)], keep)


def _scaled_list(values, factor):
    """``values * factor`` out of place; ``factor`` a Python float or a 0-dim tensor."""
    return torch._foreach_mul(values, factor)


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, *,
              lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled,
              inv_scale, clip_coef, skip, cache):
    """One Adam/AdamW step over a bucket; see docs/architecture.md for the contract."""
    if not params:
        return
    keep = None if skip is None else skip > 0
    params, grads, exp_avgs, exp_avg_sqs = map(_real, (params, grads, exp_avgs, exp_avg_sqs))
    max_exp_avg_sqs = _real(max_exp_avg_sqs) if amsgrad else max_exp_avg_sqs
    math = _math_dtype(params[0].dtype)
    g = _math_grads(grads, math, inv_scale, clip_coef, maximize)
    p = _math_values(params, master_params, math)
    if weight_decay != 0:
        if decoupled:
            p = _scaled_list(p, 1 - lr * weight_decay)
        else:
            g = torch._foreach_add(g, p, alpha=weight_decay)

    # 1. moments: m = β1·m + (1-β1)·g  (as a lerp), v = β2·v + (1-β2)·g²
    m_new = torch._foreach_lerp(exp_avgs, g, 1 - beta1)
    g_sq = torch._foreach_mul(g, g)
    torch._foreach_mul_(g_sq, 1 - beta2)
    v_new = _scaled_list(exp_avg_sqs, beta2)
    torch._foreach_add_(v_new, g_sq)
    v_used = torch._foreach_maximum(max_exp_avg_sqs, v_new) if amsgrad else v_new

    # 2. bias corrections from the incremented step, per tensor, in float64 like torch's
    #    host-side scalars, then as 0-dim tensors of the math dtype
    step_new = torch.stack(steps) + 1
    t = step_new.to(torch.float64)
    b1 = beta1.to(torch.float64) if torch.is_tensor(beta1) else beta1
    b2 = beta2.to(torch.float64) if torch.is_tensor(beta2) else beta2
    lr64 = lr.to(torch.float64) if torch.is_tensor(lr) else lr
    step_size = list((lr64 / (1 - b1 ** t)).to(math).unbind(0))
    bc2_sqrt = list((1 - b2 ** t).sqrt().to(math).unbind(0))

    # 3. p = p - step_size · m / (sqrt(v) / sqrt(bc2) + eps)
    denom = torch._foreach_sqrt(v_used)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(m_new, denom)
    torch._foreach_mul_(update, step_size)
    p_new = torch._foreach_sub(p, update)

    # 4. commit (a select per tensor when the step may be skipped)
    _commit(exp_avgs, m_new, keep)
    _commit(exp_avg_sqs, v_new, keep)
    if amsgrad:
        _commit(max_exp_avg_sqs, v_used, keep)
    _commit_params(params, master_params, p_new, keep)
    _commit_scalars(steps, step_new, keep)


def sgd_step(params, grads, momentum_buffers, master_params, initialized, *, lr, momentum,
             dampening, weight_decay, nesterov, maximize, inv_scale, clip_coef, skip, cache):
    """One SGD step over a bucket (torch.optim.SGD semantics); see docs/architecture.md."""
    if not params:
        return
    keep = None if skip is None else skip > 0
    params, grads = _real(params), _real(grads)
    momentum_buffers = _real(momentum_buffers) if momentum != 0 else momentum_buffers
    math = _math_dtype(params[0].dtype)
    d = _math_grads(grads, math, inv_scale, clip_coef, maximize)
    p = _math_values(params, master_params, math)
    if weight_decay != 0:
        d = torch._foreach_add(d, p, alpha=weight_decay)

    if momentum != 0:
        # buf = d on the first step (torch clones the gradient), else μ·buf + (1-τ)·d
        blended = _scaled_list(momentum_buffers, momentum)
        torch._foreach_add_(blended, d, alpha=1 - dampening)
        was_set = torch.stack(initialized) > 0
        buf_new = [torch.where(flag, b, g_) for flag, b, g_ in zip(was_set.unbind(0), blended, d)]
        d = torch._foreach_add(d, buf_new, alpha=momentum) if nesterov else buf_new

    p_new = torch._foreach_sub(p, _scaled_list(d, lr))

    if momentum != 0:
        _commit(momentum_buffers, buf_new, keep)
        _commit_scalars(initialized, torch.ones(len(initialized), dtype=_F32,
                                                device=initialized[0].device), keep)
    _commit_params(params, master_params, p_new, keep)
