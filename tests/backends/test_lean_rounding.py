"""The rounding of the lean Adam states through each backend's ``lean_adam_step``:

* 8-bit quantization element by element: with beta1 = beta2 = 0 a step stores exactly
  m = g and v = g*g, so the stored codes are the quantization of known values; each decodes
  to the map value nearest to its input (the maps written out in lean_reference.py);
* stochastic rounding is unbiased: the mean of many rounded values is the unrounded one
  (bf16 and fp16 params -- normal, subnormal and below the smallest fp16 subnormal -- and
  bf16 moments), where rounding to nearest is measurably off;
* the random bits depend on the seed, the step and the stream, and the cpu kernels give
  the same bits with 1 and 2 threads, equal to the torch backend's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lean_reference as ref
from lean_helpers import LeanBucket, lean_module

# masked tail lanes divide 0 by 0 (eps = 0) or inf by inf in the Triton interpreter's NumPy;
# they are never stored
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in divide:RuntimeWarning")

EXACT = dict(beta1=0.0, beta2=0.0, eps=0.0, weight_decay=0.0)  # m = g, v = g*g


def _blocks_with_known_values(device, gen):
    """(values, absmax per block): each 256-block has its largest magnitude first."""
    scales = [1.0, 3e-3, 7.5, 2.0 ** -60, 1e5]
    values = []
    for s in scales:
        blk = torch.randn(256, generator=gen) * torch.exp(torch.randn(256, generator=gen) * 2)
        blk = blk / blk.abs().max() * 0.999
        blk[0] = -1.0 if s == 7.5 else 1.0
        values.append(blk * s)
    values.append(torch.tensor([0.25, -0.5, 1e-7, 0.0, -0.0]))  # a partial last block
    return torch.cat(values).to(device)


def _nearest_error(x, codes, absmax, table):
    """|decoded - x| minus the distance of x to the nearest map value (>= 0, ~0 if nearest)."""
    decoded = table[codes] * np.repeat(absmax, 256)[:len(x)]
    candidates = table[None, :] * np.repeat(absmax, 256)[:len(x), None]
    best = np.abs(candidates - x[:, None]).min(axis=1)
    return np.abs(decoded - x) - best


def test_8bit_codes_decode_to_the_nearest_map_value(backend):
    module, device = lean_module(backend)
    g = _blocks_with_known_values(device, torch.Generator().manual_seed(3))
    bucket = LeanBucket([tuple(g.shape)], state="q8", device=device)
    bucket.step(module, [g], **EXACT)
    x = g.cpu().numpy().astype(np.float64)
    m_codes = bucket.exp_avgs[0].cpu().numpy()
    m_absmax = bucket.m_absmax[0].cpu().numpy()
    v_codes = bucket.exp_avg_sqs[0].cpu().numpy()
    v_absmax = bucket.v_absmax[0].cpu().numpy()
    blocks = np.split(np.abs(x), np.arange(256, len(x), 256))
    np.testing.assert_array_equal(m_absmax, [b.max() for b in blocks])
    signed = np.concatenate([-ref.SIGNED_MAGNITUDES[::-1], ref.SIGNED_MAGNITUDES[1:]])
    m_table = np.zeros(256)  # by code byte
    for c in range(-127, 128):
        m_table[c & 0xFF] = signed[c + 127]
    m_table[128] = -1.0
    err = _nearest_error(x, m_codes.view(np.uint8), m_absmax, m_table)
    scale = np.repeat(m_absmax, 256)[:len(x)]
    assert (err <= 1e-6 * scale).all()  # nearest (ties: a 1e-6 band around the midpoints)
    nonzero = m_codes != 0
    assert (np.sign(m_codes[nonzero]) == np.sign(x[nonzero])).all()
    assert (m_codes[x == 0] == 0).all()
    v = (g * g).cpu().numpy().astype(np.float64)
    v_max = np.array([b.max() for b in np.split(v, np.arange(256, len(v), 256))])
    np.testing.assert_array_equal(v_absmax, np.where(v_max < 2.0 ** -100, 0.0, v_max))
    scale = np.repeat(v_absmax, 256)[:len(v)]
    assert (v_codes[scale == 0] == 0).all() and (scale == 0).any()  # 2^-120: stored as 0
    err = _nearest_error(v, v_codes, v_absmax, ref.UNSIGNED_VALUES.astype(np.float64))
    # nearest, except that a positive second moment is never stored as 0 (code 1 instead)
    tiny = v < ref.UNSIGNED_VALUES[1] / 2 * scale
    assert (err[~tiny] <= 1e-6 * scale[~tiny]).all()
    assert (v_codes[tiny & (v > 0)] == 1).all() and (v_codes[v == 0] == 0).all()
    assert tiny.any() and (v > 0)[tiny].any()  # the case is exercised


def test_8bit_map_values_round_trip_exactly(backend):
    """Every signed map value times an absmax of 1 is stored as its own code."""
    module, device = lean_module(backend)
    mags = torch.from_numpy(ref.SIGNED_MAGNITUDES.copy())
    g = torch.cat([mags, -mags]).to(device)  # each 128-block holds +-1.0
    bucket = LeanBucket([tuple(g.shape)], state="q8", device=device)
    bucket.step(module, [g], **EXACT)
    codes = bucket.exp_avgs[0].cpu().to(torch.int64)
    expected = torch.cat([torch.arange(128), -torch.arange(128)])
    assert torch.equal(codes, expected)


def _mean_after_one_step(backend, dtype, p0, lr, grad_sign, n=1 << 15, seed=5):
    """Mean of n params p0 stepped to p0 - lr*sign (exact in fp32) and rounded stochastically."""
    module, device = lean_module(backend)
    bucket = LeanBucket([(n,)], state="bf16", dtype=dtype, device=device)
    bucket.params[0].fill_(p0)
    g = torch.full((n,), float(grad_sign), device=device, dtype=dtype)
    bucket.step(module, [g], lr=lr, stochastic_rounding=True, seed=seed, **EXACT)
    return bucket.params[0].double().mean().item(), bucket


@pytest.mark.parametrize("dtype,p0,lr,grad_sign,quantum", [
    (torch.bfloat16, 1.0, 77 * 2.0 ** -16, 1, 2.0 ** -8),        # bf16, between 1 - 2^-8 and 1
    (torch.float16, 1.0, 3 * 2.0 ** -14, 1, 2.0 ** -11),         # fp16 normal
    (torch.float16, 2.0 ** -20, 5 * 2.0 ** -28, 1, 2.0 ** -24),  # fp16 subnormal
    (torch.float16, 0.0, 5 * 2.0 ** -27, -1, 2.0 ** -24),        # below the smallest fp16
], ids=["bf16", "fp16-normal", "fp16-subnormal", "fp16-tiny"])
def test_stochastic_param_rounding_is_unbiased(backend, dtype, p0, lr, grad_sign, quantum):
    exact = p0 - lr * grad_sign
    mean, bucket = _mean_after_one_step(backend, dtype, p0, lr, grad_sign)
    n = bucket.params[0].numel()
    frac = (exact % quantum) / quantum
    sigma = quantum * np.sqrt(frac * (1 - frac) / n)
    assert abs(mean - exact) < 5 * sigma
    values = set(bucket.params[0].double().unique().tolist())
    assert values <= {exact - exact % quantum, exact - exact % quantum + quantum}
    nearest = torch.tensor(exact, dtype=torch.float32).to(dtype).double().item()
    assert abs(nearest - exact) > 20 * sigma  # round-to-nearest is measurably biased here


def test_bf16_moments_are_rounded_without_bias(backend):
    module, device = lean_module(backend)
    n = 1 << 15
    g_value = 1.0 + 77 * 2.0 ** -16  # fp32, between two bf16 values
    bucket = LeanBucket([(n,)], state="bf16", device=device)
    bucket.step(module, [torch.full((n,), g_value, device=device)], **EXACT)
    v_value = float(np.float32(g_value) * np.float32(g_value))
    for stored, exact in ((bucket.exp_avgs[0], g_value), (bucket.exp_avg_sqs[0], v_value)):
        quantum = 2.0 ** (np.floor(np.log2(exact)) - 7)
        frac = (exact % quantum) / quantum
        sigma = quantum * np.sqrt(frac * (1 - frac) / n)
        assert abs(stored.double().mean().item() - exact) < 5 * sigma


def test_random_bits_follow_seed_step_and_stream(backend):
    _, a = _mean_after_one_step(backend, torch.bfloat16, 1.0, 77 * 2.0 ** -16, 1, n=4096, seed=5)
    _, b = _mean_after_one_step(backend, torch.bfloat16, 1.0, 77 * 2.0 ** -16, 1, n=4096, seed=5)
    _, c = _mean_after_one_step(backend, torch.bfloat16, 1.0, 77 * 2.0 ** -16, 1, n=4096, seed=6)
    assert torch.equal(a.params[0], b.params[0])
    assert not torch.equal(a.params[0], c.params[0])
    module, device = lean_module(backend)
    two = LeanBucket([(4096,), (4096,)], state="bf16", dtype=torch.bfloat16, device=device,
                     streams=[1, 2])
    for p in two.params:
        p.fill_(1.0)
    g = torch.ones(4096, device=device, dtype=torch.bfloat16)
    two.step(module, [g, g], lr=77 * 2.0 ** -16, stochastic_rounding=True, **EXACT)
    assert not torch.equal(two.params[0], two.params[1])  # distinct streams, distinct bits
    first = two.params[0].clone()
    two.params[0].fill_(1.0)
    two.step(module, [g, g], lr=77 * 2.0 ** -16, stochastic_rounding=True, **EXACT)
    assert not torch.equal(first, two.params[0])  # the next step draws new bits
