"""The kernel boundary of the compiled lean Adam launchers (cpu, triton; cuda on a GPU):
every list is verified before a kernel runs -- moments of the wrong dtype or layout, absmax
lists of the wrong size, missing absmax lists, stream ids out of range -- with an error
naming the list, and a refused step changes no byte."""

from __future__ import annotations

import pytest
import torch

from lean_helpers import LeanBucket, assert_unchanged, lean_module, make_grads, snapshot

SHAPES = [(300,), (4, 5)]


@pytest.fixture
def compiled(backend):
    if backend == "torch":
        pytest.skip("the torch backend addresses no raw memory: no kernel boundary")
    return lean_module(backend)


def _refused(module, bucket, grads, match, error=(TypeError, ValueError), **kw):
    before = snapshot(bucket.tensors())
    with pytest.raises(error, match=match):
        bucket.step(module, grads, **kw)
    assert_unchanged(before, bucket.tensors())


def test_a_moment_of_the_wrong_dtype_is_refused(compiled):
    module, device = compiled
    bucket = LeanBucket(SHAPES, state="q8", device=device)
    grads = make_grads(SHAPES, 1, device=device)[0]
    bucket.exp_avg_sqs[1] = bucket.exp_avg_sqs[1].to(torch.int8)
    _refused(module, bucket, grads, r"exp_avg_sqs\[1\] has dtype torch.int8")


def test_bf16_moments_with_another_layout_are_refused(compiled):
    module, device = compiled
    bucket = LeanBucket(SHAPES, state="bf16", device=device)
    grads = make_grads(SHAPES, 1, device=device)[0]
    bucket.exp_avgs[1] = torch.zeros(5, 4, dtype=torch.bfloat16, device=device).t()
    _refused(module, bucket, grads, r"exp_avgs\[1\] has strides")


@pytest.mark.parametrize("bad", ["short", "2-d", "strided", "missing"])
def test_bad_absmax_lists_are_refused(compiled, bad):
    module, device = compiled
    bucket = LeanBucket(SHAPES, state="q8", device=device)
    grads = make_grads(SHAPES, 1, device=device)[0]
    if bad == "short":
        bucket.m_absmax[0] = torch.zeros(1, device=device)  # 300 elements need 2
    elif bad == "2-d":
        bucket.v_absmax[0] = torch.zeros(2, 1, device=device)
    elif bad == "strided":
        bucket.v_absmax[0] = torch.zeros(4, device=device)[::2]
    else:
        bucket.m_absmax = None
    _refused(module, bucket, grads, r"absmax")


def test_a_step_after_a_refused_one_runs(compiled):
    module, device = compiled
    bucket = LeanBucket(SHAPES, state="q8", device=device)
    grads = make_grads(SHAPES, 1, device=device)[0]
    good = bucket.m_absmax[0]
    bucket.m_absmax[0] = torch.zeros(7, device=device)
    _refused(module, bucket, grads, r"absmax")
    bucket.m_absmax[0] = good
    bucket.step(module, grads)
    assert all(s.item() == 1.0 for s in bucket.steps)


def test_streams_and_seed_out_of_range_are_refused(compiled):
    module, device = compiled
    bucket = LeanBucket(SHAPES, state="bf16", device=device, streams=[1, 2 ** 32])
    grads = make_grads(SHAPES, 1, device=device)[0]
    _refused(module, bucket, grads, r"\[0, 2\^32\)")
    bucket.streams = [1]
    _refused(module, bucket, grads, r"streams has 1")
    bucket.streams = [1, 2]
    _refused(module, bucket, grads, r"\[0, 2\^32\)", seed=-1)
