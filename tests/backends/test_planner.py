"""The host-side chunk planner of the multi-tensor kernels (csrc/include/fusedopt/
multi_tensor.h), through the ``fusedopt._cpu.plan_chunks`` binding."""

from __future__ import annotations

import random

import pytest

_cpu = pytest.importorskip("fusedopt._cpu", reason="the fusedopt._cpu extension is not built")


def expand(plan):
    """(launch, global tensor, start) for every chunk, in chunk order."""
    out = []
    for li, (s0, s1, c0, c1) in enumerate(plan["launches"]):
        for c in range(c0, c1):
            slot = plan["chunk_slot"][c]
            assert 0 <= slot < s1 - s0
            out.append((li, plan["slot_tensor"][s0 + slot], plan["chunk_start"][c]))
    return out


def check_invariants(numel, chunk, max_tensors, max_chunks):
    plan = _cpu.plan_chunks(numel, chunk, max_tensors, max_chunks)
    assert plan["chunk_size"] == chunk
    # every chunk of every tensor exactly once, in tensor order then element order
    expected = [(t, k * chunk) for t, n in enumerate(numel) for k in range(-(-n // chunk))]
    chunks = expand(plan)
    assert [(t, start) for _, t, start in chunks] == expected
    # launches tile the slot and chunk arrays, within the limits, none empty
    slot_end = chunk_end = 0
    for li, (s0, s1, c0, c1) in enumerate(plan["launches"]):
        assert (s0, c0) == (slot_end, chunk_end)
        assert 1 <= s1 - s0 <= max_tensors and 1 <= c1 - c0 <= max_chunks
        slots = plan["slot_tensor"][s0:s1]
        assert len(set(slots)) == len(slots) and slots == sorted(slots)
        # each slot is used by a chunk of this launch
        assert {t for l, t, _ in chunks if l == li} == set(slots)
        slot_end, chunk_end = s1, c1
    assert slot_end == len(plan["slot_tensor"]) and chunk_end == len(plan["chunk_start"])
    assert all(numel[t] > 0 for t in plan["slot_tensor"])  # empty tensors take no slot
    return plan


def test_small_example_worked_by_hand():
    # chunk 4: tensor 0 (5) -> starts 0, 4; tensor 1 empty; tensor 2 (12) -> 0, 4, 8;
    # tensor 3 (3) -> 0. At most 2 tensors and 4 chunks per launch:
    # launch 0 = t0 (0, 4) + t2 (0, 4); launch 1 = t2 (8) + t3 (0): t2 takes a slot again.
    plan = _cpu.plan_chunks([5, 0, 12, 3], 4, 2, 4)
    assert plan["launches"] == [(0, 2, 0, 4), (2, 4, 4, 6)]
    assert plan["slot_tensor"] == [0, 2, 2, 3]
    assert plan["chunk_slot"] == [0, 0, 1, 1, 0, 1]
    assert plan["chunk_start"] == [0, 4, 0, 4, 8, 0]


def test_one_launch_when_everything_fits():
    plan = check_invariants([1, 65536, 65537], 65536, 110, 320)
    assert len(plan["launches"]) == 1
    assert plan["chunk_start"] == [0, 0, 0, 65536]


def test_tensor_limit_splits_launches():
    plan = check_invariants([3] * 250, 65536, 110, 320)
    assert [s1 - s0 for s0, s1, _, _ in plan["launches"]] == [110, 110, 30]


def test_chunk_limit_splits_a_tensor_over_launches():
    plan = check_invariants([10], 1, 5, 3)
    assert [(c0, c1) for _, _, c0, c1 in plan["launches"]] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert plan["slot_tensor"] == [0, 0, 0, 0]


def test_one_tensor_per_launch():
    plan = check_invariants([4, 9, 1], 4, 1, 100)
    assert plan["slot_tensor"] == [0, 1, 2]
    assert [c1 - c0 for _, _, c0, c1 in plan["launches"]] == [1, 3, 1]


def test_empty_inputs_give_no_launch():
    for numel in ([], [0], [0, 0, 0]):
        plan = check_invariants(numel, 8, 2, 2)
        assert plan["launches"] == [] and plan["chunk_start"] == []


def test_random_sizes_and_limits_keep_the_invariants():
    rng = random.Random(0)
    for _ in range(200):
        numel = [rng.choice([0, 1, rng.randrange(1, 50), rng.randrange(50, 400)])
                 for _ in range(rng.randrange(0, 40))]
        check_invariants(numel, rng.randrange(1, 64), rng.randrange(1, 8), rng.randrange(1, 12))


def test_chunk_starts_are_64_bit():
    plan = _cpu.plan_chunks([3 * 2**31 + 5], 2**31, 110, 320)
    assert plan["chunk_start"] == [0, 2**31, 2**32, 3 * 2**31]


@pytest.mark.parametrize("args", [([3], 0, 1, 1), ([3], 4, 0, 1), ([3], 4, 1, 0), ([-1], 4, 1, 1)])
def test_bad_arguments_are_refused(args):
    with pytest.raises(ValueError, match="invalid plan"):
        _cpu.plan_chunks(*args)
