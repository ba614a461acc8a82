"""Shared helpers of the loss tests: references in float64 and the tolerance rules.

Each comparison gets the tolerance of the precision the code under test computes in:
- a loss computed in fp32 and returned in bf16/fp16 is rounded once: `assert_rounded_once`
  (half an ulp of the low precision plus fp32 error);
- a gradient stored in bf16/fp16 gets flash-attention's rule, `assert_lowp_rule` (error
  against the float64 reference at most twice PyTorch's own error in that precision)."""

import torch

IGNORE = -100
LOW_PRECISION = (torch.bfloat16, torch.float16)


def grads_of(loss, x, grad_output=None):
    """d(loss)/dx by autograd, with `grad_output` (default: ones) for non-scalar losses."""
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    (g,) = torch.autograd.grad(loss, x, grad_output)
    return g


def random_grad_output(loss, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(loss.shape, generator=gen, dtype=torch.float32).to(loss.device, loss.dtype)


def assert_close(got, want, rtol=1e-5, atol=1e-6, what=""):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=rtol, atol=atol,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_lowp_rule(got, ref64, torch_lowp, dtype, what=""):
    """flash-attention's rule: max |got - ref| <= 2 * max |torch_lowp - ref| + one ulp of
    the largest reference value in `dtype` (the unavoidable rounding of the final store)."""
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    ref = ref64.double().cpu()
    ours = (got.double().cpu() - ref).abs().max().item() if ref.numel() else 0.0
    theirs = (torch_lowp.double().cpu() - ref).abs().max().item() if ref.numel() else 0.0
    ulp = torch.finfo(dtype).eps * (ref.abs().max().item() if ref.numel() else 0.0)
    assert ours <= 2 * theirs + ulp + 1e-7, (
        f"{what}: error {ours:.3g} vs fp64 reference exceeds 2x torch's {dtype} error "
        f"{theirs:.3g} + ulp {ulp:.3g}")


def assert_rounded_once(got, ref64, dtype, rtol=1e-5, atol=1e-6, what=""):
    """`got` (in `dtype`) is an fp32-accurate value rounded once to `dtype`: per element
    |got - ref| <= (eps(dtype) / 2 + rtol) |ref| + atol, where eps/2 is the largest
    relative error of a round-to-nearest and rtol the fp32 computation's."""
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    torch.testing.assert_close(got.double().cpu(), ref64.double().cpu(),
                               rtol=torch.finfo(dtype).eps / 2 + rtol, atol=atol,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")
