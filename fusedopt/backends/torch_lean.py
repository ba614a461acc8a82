"""Pure-PyTorch lean Adam step of the `torch` backend (contract: docs/architecture.md,
"Lean Adam"; semantics: docs/lean_states.md).

The update is the same sequence of separately rounded fp32 operations as the compiled and
Triton kernels (math_lean.h), so every backend gives the same bits:

    g' = ((g * inv_scale) * clip_coef) * (maximize ? -1 : 1)
    AdamW: p = p * (1 - lr*wd)        Adam: g' = g' + wd*p
    m = b1*m + (1-b1)*g'              v = b2*v + (1-b2)*(g'*g')
    p = p + (-lr/(1-b1^t) * m) / (sqrt(v) * (1/sqrt(1-b2^t)) + eps)

with the per-tensor coefficients formed in float64 (b^t by repeated squaring) and rounded
once to fp32.  Moments are decoded before and encoded after (bf16 with stochastic rounding;
8-bit blockwise with the dynamic maps, lean_math.py); bf16/fp16 params without masters are
rounded stochastically when asked.  Every new value is computed out of place and committed
with ``torch.where(skip > 0, old, new)``, so a skipped step changes no byte.  Per tensor it
allocates int64 index and random-bit temporaries: this backend is the readable reference,
not a fast path.
"""

from __future__ import annotations

import torch

from fusedopt.backends import lean_math as lm

__all__ = ["lean_adam_step"]

OPS: frozenset[str] = frozenset({"lean_adam"})

_F32, _F64, _I64 = torch.float32, torch.float64, torch.int64


def _hyper64(value, device):
    """A hyper-parameter (Python float or 0-dim tensor) as float64 on ``device``."""
    if torch.is_tensor(value):
        return value.to(device=device, dtype=_F64).reshape(())
    return torch.tensor(float(value), dtype=_F64, device=device)


def _pow_by_squaring(base: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """base**n (float64) for int64 n >= 0 with the products of math_lean.h's loop."""
    result = torch.ones_like(base)
    for _ in range(32):
        result = torch.where((n & 1) == 1, result * base, result)
        n = n >> 1
        base = torch.where(n != 0, base * base, base)
    return result


def _coefficients(lr, beta1, beta2, eps, weight_decay, decoupled, t, device):
    """Per-tensor fp32 coefficients (1-D tensors over the bucket) from the new steps ``t``."""
    lr64, b1, b2 = _hyper64(lr, device), _hyper64(beta1, device), _hyper64(beta2, device)
    bc1 = 1.0 - _pow_by_squaring(b1.expand(t.shape), t)
    bc2 = 1.0 - _pow_by_squaring(b2.expand(t.shape), t)
    c = dict(beta1=b1.to(_F32), one_minus_beta1=(1.0 - b1).to(_F32), beta2=b2.to(_F32),
             one_minus_beta2=(1.0 - b2).to(_F32), neg_step_size=(-(lr64 / bc1)).to(_F32),
             inv_bc2_sqrt=(1.0 / bc2.sqrt()).to(_F32))
    c["decay"] = (1.0 - lr64 * float(weight_decay)).to(_F32) if decoupled else None
    c["l2"] = (None if decoupled or weight_decay == 0
               else torch.tensor(float(weight_decay), dtype=_F32, device=device))
    c["eps"] = torch.tensor(float(eps), dtype=_F32, device=device)
    return c


def _decode(m, v, m_absmax, v_absmax):
    if m.dtype == torch.int8:
        return lm.dequantize_blocks(m, m_absmax), lm.dequantize_blocks(v, v_absmax)
    return m.float(), v.float()


def _sqrt_rn(x):
    """Correctly rounded fp32 sqrt (torch's vectorised CPU fp32 sqrt is not, in ~0.7% of
    the elements; a float64 sqrt rounded to fp32 is)."""
    return x.double().sqrt().float()


def _element_math(p, g, m, v, c, i):
    """One tensor's update in fp32 (every op rounded once, no fused multiply-add)."""
    if c["decay"] is not None:
        p = p * c["decay"]
    if c["l2"] is not None:
        g = g + c["l2"] * p
    m = c["beta1"] * m + c["one_minus_beta1"] * g
    v = c["beta2"] * v + c["one_minus_beta2"] * (g * g)
    denom = _sqrt_rn(v) * c["inv_bc2_sqrt"][i] + c["eps"]
    p = p + (c["neg_step_size"][i] * m) / denom
    return p, m, v


def _encode_states(m, v, state_dtype, key, numel):
    """The new stored moments: bf16 with stochastic rounding, or 8-bit codes + absmax."""
    if state_dtype == torch.float32:
        return (m, v), ()
    if state_dtype == torch.bfloat16:
        r = lm.element_bits(key, numel)
        return (lm.round_bf16_stochastic(m, r & 0xFFFF), lm.round_bf16_stochastic(v, r >> 16)), ()
    m_codes, m_absmax = lm.quantize_blocks(m, signed=True)
    v_codes, v_absmax = lm.quantize_blocks(v, signed=False)
    return (m_codes, v_codes), (m_absmax, v_absmax)


def _round_param(p_new, dtype, stochastic, key, numel):
    if dtype == _F32:
        return p_new
    if not stochastic:
        return p_new.to(dtype)
    r = lm.element_bits(key, numel)
    if dtype == torch.bfloat16:
        return lm.round_bf16_stochastic(p_new, r >> 16)
    return lm.round_fp16_stochastic(p_new, r)


def _commit(target, new, keep):
    """target <- new, or the old bits where ``keep`` (0-dim bool) is true."""
    if keep is not None:
        new = torch.where(keep, target, new)
    target.copy_(new)


def lean_adam_step(params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes, exp_avg_sq_absmaxes,
                   master_params, steps, streams, *, lr, beta1, beta2, eps, weight_decay,
                   maximize, decoupled, stochastic_rounding, seed, inv_scale, clip_coef, skip,
                   cache):
    """One lean Adam/AdamW step over a bucket; see docs/architecture.md for the contract."""
    if not params:
        return
    device = params[0].device
    keep = None if skip is None else skip > 0
    state_dtype = exp_avgs[0].dtype
    quantized = state_dtype == torch.int8
    step_new = torch.stack(steps) + 1
    t = step_new.to(_I64)
    c = _coefficients(lr, beta1, beta2, eps, weight_decay, decoupled, t, device)
    state_keys = [lm.tensor_key(seed, s, t[i], lm.STATE_BITS) for i, s in enumerate(streams)]
    param_keys = [lm.tensor_key(seed, s, t[i], lm.PARAM_BITS) for i, s in enumerate(streams)]

    flat = lm.flat_memory  # every tensor of a param walked as 1-D memory, like the kernels
    for i, (param, grad) in enumerate(zip(params, grads)):
        g = flat(grad).float()
        if inv_scale is not None:
            g = g * inv_scale
        if clip_coef is not None:
            g = g * clip_coef
        if maximize:
            g = -g
        p = flat(master_params[i]) if master_params is not None else flat(param).float()
        absmax = (exp_avg_absmaxes[i], exp_avg_sq_absmaxes[i]) if quantized else (None, None)
        m, v = _decode(flat(exp_avgs[i]), flat(exp_avg_sqs[i]), *absmax)
        p_new, m_new, v_new = _element_math(p, g, m, v, c, i)
        (m_store, v_store), absmax_new = _encode_states(m_new, v_new, state_dtype,
                                                        state_keys[i], param.numel())
        _commit(flat(exp_avgs[i]), m_store, keep)
        _commit(flat(exp_avg_sqs[i]), v_store, keep)
        if quantized:
            _commit(exp_avg_absmaxes[i], absmax_new[0], keep)
            _commit(exp_avg_sq_absmaxes[i], absmax_new[1], keep)
        if master_params is not None:
            _commit(flat(master_params[i]), p_new, keep)
        stochastic = stochastic_rounding and master_params is None
        _commit(flat(param), _round_param(p_new, param.dtype, stochastic, param_keys[i],
                                          param.numel()), keep)
    new_steps = step_new if keep is None else torch.where(keep, torch.stack(steps), step_new)
    torch._foreach_copy_(steps, list(new_steps.unbind(0)))
