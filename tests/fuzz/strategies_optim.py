"""Hypothesis strategies of optimizer fuzz specs (plain data; cases_optim.py builds them)."""

from __future__ import annotations

from hypothesis import strategies as st

SHAPES = ((3,), (5, 7), (2, 3, 2, 2), (1,), (0,), (4, 1), (1, 3, 1, 2), ())


@st.composite
def param_specs(draw, backend, dtype=None):
    n = draw(st.integers(1, 4))
    dtype = dtype or draw(st.sampled_from(("float32", "float32", "bfloat16", "float16")))
    out = []
    for _ in range(n):
        shape = draw(st.sampled_from(SHAPES))
        layout = "contiguous"
        if len(shape) == 4:
            layout = draw(st.sampled_from(("contiguous", "channels_last")))
        elif len(shape) == 2:
            layout = draw(st.sampled_from(("contiguous", "transposed")))
        out.append(dict(shape=shape, dtype=dtype, layout=layout,
                        group=draw(st.integers(0, 1)),
                        grad_layout=draw(st.sampled_from(("same", "contiguous")))))
    return out


LEAN = {None: {}, "bf16": dict(state_dtype="bfloat16"), "int8": dict(state_dtype="int8"),
        "stochastic": dict(param_rounding="stochastic"),
        "int8+stochastic": dict(state_dtype="int8", param_rounding="stochastic")}


def _hyper(draw, optimizer, lowp, lean):
    lr = draw(st.sampled_from((1e-3, 1e-2, 0.5, 10.0)))
    hyper = dict(lr=lr, weight_decay=draw(st.sampled_from((0.0, 0.0, 1e-2, 0.5))),
                 maximize=draw(st.booleans()),
                 max_grad_norm=draw(st.sampled_from((None, None, 1.0, 1e-3, 1e6))),
                 skip_nonfinite=draw(st.booleans()))
    if optimizer == "sgd":
        momentum = draw(st.sampled_from((0.0, 0.9, 0.5)))
        hyper.update(momentum=momentum,
                     dampening=draw(st.sampled_from((0.0, 0.0, 0.3))),
                     nesterov=draw(st.booleans()))
    else:
        hyper.update(betas=draw(st.sampled_from(((0.9, 0.999), (0.0, 0.0), (0.5, 0.99999)))),
                     eps=draw(st.sampled_from((1e-8, 1e-30, 1.0, 0.0))),
                     amsgrad=draw(st.booleans()))
        if lowp:
            hyper["master_weights"] = draw(st.booleans())
        options = LEAN[draw(st.sampled_from(sorted(LEAN, key=str)))] if lean else {}
        if options:  # memory-lean states (their dtypes by name: the spec is plain data)
            hyper.update(options, amsgrad=False, seed=draw(st.integers(0, 2 ** 32 - 1)))
    return hyper


@st.composite
def optim_spec(draw, backend, lean=False):
    """A run's spec; with ``lean`` Adam may keep memory-lean states (bf16 / 8-bit moments,
    stochastic rounding of low-precision params)."""
    optimizer = draw(st.sampled_from(("adam", "adamw", "sgd")))
    params = draw(param_specs(backend))
    lowp = params[0]["dtype"] != "float32"
    hyper = _hyper(draw, optimizer, lowp, lean)
    if hyper.get("nesterov") and (hyper["momentum"] == 0 or hyper["dampening"] != 0):
        hyper["nesterov"] = False  # torch refuses that (tested among the bad arguments)
    steps = draw(st.integers(1, 4))
    specials = ()
    if draw(st.integers(0, 2)) == 0:
        specials = tuple(draw(st.lists(st.tuples(
            st.integers(0, steps - 1), st.integers(0, 3), st.integers(0, 100),
            st.sampled_from(("inf", "-inf", "nan"))), min_size=1, max_size=2)))
    scaler = draw(st.sampled_from((None, None, "loss_scaler", "grad_scaler")))
    overrides = {}
    if draw(st.booleans()):
        overrides[1] = {"lr": draw(st.sampled_from((0.0, 1e-4, 1.0)))}
    return dict(seed=draw(st.integers(0, 2 ** 20)), optimizer=optimizer, params=params,
                hyper=hyper, group_overrides=overrides, steps=steps, backend=backend,
                grad_scale=draw(st.sampled_from((1.0, 1e-20, 1e3))), specials=specials,
                scaler=scaler, init_scale=draw(st.sampled_from((1.0, 2.0 ** 16, 2.0 ** 120))))


EDITS = {
    "state": ("delete", "wrong_shape", "uint8", "float64", "transposed", "freed", "shrunk",
              "tagged", "wrapper", "meta", "negated", "python_float", "reset",
              "freed_float64"),
    "checkpoint": ("delete", "wrong_shape", "uint8", "float64", "python_float", "extra_index",
                   "string", "tagged", "wrapper", "meta", "freed", "shrunk", "negated",
                   "drop_groups"),
    "grad": ("bf16_data", "wrong_shape_data", "float64", "sparse", "tagged", "wrapper",
             "freed", "shrunk", "negated", "meta", "expanded"),
    "hyper": ("nan", "negative", "string", "inf", "tensor2", "int_tensor", "huge",
              "freed_tensor", "meta_tensor"),
    "param_storage": ("freed",),
}


@st.composite
def edit_spec(draw, backend):
    spec = draw(optim_spec(backend, lean=True))
    spec.update(specials=(), scaler=None, steps=draw(st.integers(2, 3)), grad_scale=1.0)
    kind = draw(st.sampled_from(sorted(EDITS)))
    spec["edit"] = (kind, draw(st.integers(0, 7)), draw(st.integers(0, 11)),
                    draw(st.sampled_from(EDITS[kind])))
    return spec
