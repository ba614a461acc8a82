"""torch's constructor keywords: every argument torch.optim.Adam / AdamW / SGD take is taken
with torch's meaning (decoupled_weight_decay makes FusedAdam an AdamW, per group and in the
checkpoint as in torch; foreach / fused / capturable choose nothing; differentiable=True is
refused), and the param groups carry torch's keys."""

import copy
import inspect

import pytest
import torch

import fusedopt as fo
from conftest import require_op
from optim_helpers import assert_params_close, clone_params, make_grads, make_params, train

PAIRS = [(fo.optim.FusedAdam, torch.optim.Adam), (fo.optim.FusedAdamW, torch.optim.AdamW),
         (fo.optim.FusedSGD, torch.optim.SGD)]
IDS = ["adam", "adamw", "sgd"]


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=IDS)
def test_every_torch_argument_is_taken_as_torch_passes_it(ours, theirs):
    """Every parameter of torch's constructor, passed the way torch's signature allows
    (positionally up to its first keyword-only one), with torch's default value."""
    sig = inspect.signature(theirs.__init__)
    params = [p for name, p in sig.parameters.items() if name not in ("self", "params")]
    positional = [p.default for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    keywords = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    opt = ours(make_params(), *positional, **keywords)
    group = opt.param_groups[0]
    ref_group = theirs(make_params(), *positional, **keywords).param_groups[0]
    assert set(group) == set(ref_group)
    for name, value in ref_group.items():
        if name != "params":
            assert group[name] == value, name


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=IDS)
@pytest.mark.parametrize("choice", [dict(foreach=True), dict(foreach=False, fused=False),
                                    dict(fused=True), dict(capturable=True)],
                         ids=["foreach", "unfused", "fused", "capturable"])
def test_implementation_keywords_choose_nothing(backend, ours, theirs, choice):
    """foreach / fused / capturable select among torch's implementations; the fused step is
    the same whatever they say (torch's own validation of them, e.g. fused=True on a device
    without a fused kernel, is not repeated)."""
    device = require_op(backend, "sgd" if ours is fo.optim.FusedSGD else "adam")
    if ours is fo.optim.FusedSGD and "capturable" in choice:
        pytest.skip("torch's SGD has no capturable argument (FusedSGD accepts it: test below)")
    plain = make_params(device=device)
    chosen, ref = clone_params(plain), clone_params(plain)
    grads = make_grads(steps=3)
    train(ours(plain, lr=1e-2, backend=backend), plain, grads)
    opt = ours(chosen, lr=1e-2, backend=backend, **choice)
    train(opt, chosen, grads)
    train(theirs(ref, lr=1e-2), ref, grads)
    assert all(torch.equal(a, b) for a, b in zip(plain, chosen))
    assert_params_close(chosen, ref)
    assert all(opt.param_groups[0][k] == v for k, v in choice.items())


def test_fused_sgd_takes_capturable_without_a_group_key():
    opt = fo.optim.FusedSGD(make_params(), lr=0.1, capturable=True)
    assert "capturable" not in opt.param_groups[0]  # torch's SGD groups have no such key
    with pytest.raises(TypeError, match="capturable must be a bool, got 1"):
        fo.optim.FusedSGD(make_params(), capturable=1)


@pytest.mark.parametrize("ours", [fo.optim.FusedAdam, fo.optim.FusedAdamW, fo.optim.FusedSGD],
                         ids=IDS)
def test_bad_values_and_differentiable_are_refused(ours):
    for kwargs, exc, match in [
            (dict(foreach="yes"), TypeError, r"foreach must be None or a bool, got 'yes'"),
            (dict(fused=1), TypeError, r"fused must be None or a bool, got 1"),
            (dict(differentiable=None), TypeError, r"differentiable must be a bool"),
            (dict(differentiable=True), ValueError,
             rf"differentiable=True is not supported by {ours.__name__}")]:
        with pytest.raises(exc, match=match):
            ours(make_params(), **kwargs)
    opt = ours(make_params()[:2])
    with pytest.raises(ValueError, match="differentiable=True"):
        opt.add_param_group({"params": make_params()[2:], "differentiable": True})
    assert len(opt.param_groups) == 1
    if ours is fo.optim.FusedAdam:  # AdamW takes no such argument, as torch's
        with pytest.raises(TypeError, match="decoupled_weight_decay must be a bool"):
            ours(make_params(), decoupled_weight_decay=1)


def test_decoupled_weight_decay_makes_adam_an_adamw(backend):
    """FusedAdam(decoupled_weight_decay=True) steps as torch's Adam with the same flag, which
    is AdamW; a group may override it, as in torch."""
    device = require_op(backend, "adam")
    ours = make_params(device=device)
    ref, other = clone_params(ours), clone_params(ours)
    kwargs = dict(lr=1e-2, weight_decay=0.5)

    def groups(ps):
        return [{"params": ps[:2]}, {"params": ps[2:], "decoupled_weight_decay": False}]

    opt = fo.optim.FusedAdam(groups(ours), decoupled_weight_decay=True, backend=backend,
                             **kwargs)
    ref_opt = torch.optim.Adam(groups(ref), decoupled_weight_decay=True, foreach=False,
                               **kwargs)
    grads = make_grads(steps=4)
    train(opt, ours, grads)
    train(ref_opt, ref, grads)
    train(torch.optim.Adam(other, foreach=False, **kwargs), other, grads)
    assert_params_close(ours, ref)
    assert_params_close(ours[2:], other[2:])  # the group that overrides it: plain Adam
    assert not torch.allclose(ours[0], other[0], rtol=1e-4)  # decoupled decay is visible
    assert [g["decoupled_weight_decay"] for g in opt.state_dict()["param_groups"]] == \
        [True, False]


@pytest.mark.parametrize("source,target,expected", [
    (torch.optim.AdamW, fo.optim.FusedAdam, True),      # torch's Adam takes the flag too
    (torch.optim.Adam, fo.optim.FusedAdamW, True),      # AdamW forces it, as torch's does
    (torch.optim.Adam, fo.optim.FusedAdam, False),
    (fo.optim.FusedAdamW, torch.optim.Adam, True),
])
def test_decoupled_weight_decay_travels_with_the_checkpoint_as_in_torch(source, target,
                                                                         expected):
    """What the flag is after a checkpoint crosses between Adam and AdamW, ours or torch's,
    and the steps that follow equal torch's."""
    grads = make_grads(steps=6)
    first = make_params()
    src = source(first, lr=1e-2, weight_decay=0.3)
    train(src, first, grads[:3])
    saved = src.state_dict()
    for g in saved["param_groups"]:
        if source is torch.optim.Adam:
            g.pop("decoupled_weight_decay")  # as saved by a torch version without the key
    resumed = clone_params(first)
    dst = target(resumed, lr=1e-2)
    dst.load_state_dict(copy.deepcopy(saved))  # torch's loader keeps the given tensors
    assert dst.param_groups[0]["decoupled_weight_decay"] is expected
    ref = clone_params(first)
    ref_opt = (torch.optim.AdamW if expected else torch.optim.Adam)(ref, lr=1e-2)
    ref_opt.load_state_dict(copy.deepcopy(saved))
    train(dst, resumed, grads[3:])
    train(ref_opt, ref, grads[3:])
    assert_params_close(resumed, ref)


def test_amsgrad_is_positional_as_in_torch():
    opt = fo.optim.FusedAdamW(make_params(), 1e-3, (0.9, 0.99), 1e-8, 0.1, True)
    assert opt.param_groups[0]["amsgrad"] is True
