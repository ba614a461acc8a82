"""Hypothesis strategies of fuzz specs: plain data the worker turns into tensors
(build.py).  Sizes stay small (the Triton kernels run in the interpreter); values, layouts
and arguments reach for the edges: -inf/inf/NaN, huge and offset logits, a single class,
empty inputs, strided/transposed/expanded/channels_last views, every flag."""

from __future__ import annotations

from hypothesis import strategies as st

LOGIT_DTYPES = ("float32", "bfloat16", "float16")
LAYOUTS_2D = ("contiguous", "transposed", "row_strided", "col_strided", "expanded", "offset")
LAYOUTS_KD = ("contiguous", "transposed", "col_strided", "offset")


def sizes(backend: str):
    """(max rows, max classes) for a backend (the interpreter is slow)."""
    return (3, 10) if backend == "triton" else (6, 40)


@st.composite
def values(draw, shape, dtype=None, layouts=LAYOUTS_2D, allow_nonfinite=True):
    dtype = dtype or draw(st.sampled_from(LOGIT_DTYPES))
    kind = draw(st.sampled_from(("normal", "normal", "uniform", "equal", "integers")))
    scale = draw(st.sampled_from((1.0, 3.0, 30.0, 1e-3, 300.0)))
    offsets = (0.0, 0.0, 0.0, 1e3, -1e4) + ((1e6, 1e30) if dtype == "float32" else ())
    offset = draw(st.sampled_from(offsets))
    specials = ()
    if allow_nonfinite and draw(st.integers(0, 3)) == 0:
        specials = tuple(draw(st.lists(st.tuples(st.integers(0, 10 ** 6),
                                                 st.sampled_from(("-inf", "-inf", "inf",
                                                                  "nan"))),
                                       min_size=1, max_size=3)))
    layout = draw(st.sampled_from(layouts)) if len(shape) >= 2 else "contiguous"
    if len(shape) == 4 and draw(st.booleans()):
        layout = "channels_last"
    return dict(shape=tuple(shape), dtype=dtype, kind=kind, scale=scale, offset=offset,
                specials=specials, layout=layout)


@st.composite
def class_shape(draw, backend, min_rows=0):
    """(N, C), (C,) or (N, C, d1[, d2])."""
    max_rows, max_classes = sizes(backend)
    n = draw(st.integers(min_rows, max_rows))
    c = draw(st.one_of(st.just(1), st.integers(1, max_classes)))
    form = draw(st.sampled_from(("2d", "2d", "2d", "1d", "kd", "kd2")))
    if form == "1d":
        return (c,)
    if form == "kd":
        return (n, c, draw(st.integers(1, 3)))
    if form == "kd2":
        return (n, c, draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    return (n, c)


@st.composite
def loss_common(draw, backend, soft_ok=True):
    """The spec keys shared by the softmax losses: input, target, weights, ignore_index."""
    shape = draw(class_shape(backend))
    layouts = LAYOUTS_2D if len(shape) == 2 else LAYOUTS_KD
    inp = draw(values(shape, layouts=layouts))
    n_classes = shape[1] if len(shape) >= 2 else shape[0]
    soft = soft_ok and draw(st.integers(0, 3)) == 0
    ignore_index = draw(st.sampled_from((-100, -100, 0, n_classes - 1, 2 ** 62)))
    spec = dict(seed=draw(st.integers(0, 2 ** 20)), input=inp, soft=soft,
                requires_grad=draw(st.integers(0, 5)) > 0,
                target_dtype=draw(st.sampled_from(("int64", "int64", "int32", "uint8"))),
                ignored_every=draw(st.sampled_from((0, 0, 2, 3))),
                target_sharpness=draw(st.sampled_from((1.0, 10.0, 100.0))))
    if not soft and draw(st.integers(0, 7)) == 0:
        spec["bad_target"] = draw(st.sampled_from((n_classes, -1, -5, 255)))
    return spec, ignore_index, n_classes


@st.composite
def cross_entropy_spec(draw, backend):
    spec, ignore_index, n_classes = draw(loss_common(backend))
    huge = spec["input"]["offset"] >= 1e6 or spec["input"]["scale"] >= 300
    kwargs = dict(ignore_index=ignore_index,
                  reduction=draw(st.sampled_from(("mean", "sum", "none"))),
                  label_smoothing=draw(st.sampled_from((0.0, 0.0, 0.1, 0.5, 1.0))),
                  z_loss=0.0 if huge else draw(st.sampled_from((0.0, 0.0, 1e-4, 0.1))),
                  softcap=draw(st.sampled_from((None, None, 0.5, 5.0, 30.0, 1e6))),
                  backend=backend)
    spec.update(kwargs=kwargs, weight=draw(st.sampled_from((None, None, "positive",
                                                            "with_zeros"))),
                weight_dtype=draw(st.sampled_from(("float32", "float64", "bfloat16"))),
                inplace_backward=draw(st.booleans()))
    return spec


@st.composite
def focal_spec(draw, backend):
    spec, ignore_index, n_classes = draw(loss_common(backend, soft_ok=False))
    alpha_kind = draw(st.sampled_from(("none", "float", "tensor")))
    kwargs = dict(gamma=draw(st.sampled_from((0.0, 1.0, 2.0, 4.5))),
                  ignore_index=ignore_index,
                  reduction=draw(st.sampled_from(("mean", "sum", "none"))),
                  label_smoothing=draw(st.sampled_from((0.0, 0.0, 0.1, 1.0))), backend=backend)
    if alpha_kind == "float":
        kwargs["alpha"] = draw(st.sampled_from((0.0, 0.25, 3.0)))
    spec.update(kwargs=kwargs, weight="positive" if alpha_kind == "tensor" else None)
    return spec


@st.composite
def sigmoid_focal_spec(draw, backend):
    max_rows, max_classes = sizes(backend)
    shape = tuple(draw(st.lists(st.integers(0, max_classes), min_size=1, max_size=3)))
    return dict(seed=draw(st.integers(0, 2 ** 20)),
                input=draw(values(shape, layouts=("contiguous", "transposed", "offset"))),
                soft=draw(st.booleans()), requires_grad=draw(st.integers(0, 5)) > 0,
                kwargs=dict(alpha=draw(st.sampled_from((0.25, -1.0, 0.0, 1.0))),
                            gamma=draw(st.sampled_from((0.0, 1.0, 2.0))),
                            reduction=draw(st.sampled_from(("none", "mean", "sum"))),
                            label_smoothing=draw(st.sampled_from((0.0, 0.2))),
                            backend=backend))


@st.composite
def vocab_shards_spec(draw, backend):
    max_rows, max_classes = sizes(backend)
    n, c = draw(st.integers(1, max_rows)), draw(st.integers(1, max_classes + 8))
    inp = draw(values((n, c), layouts=("contiguous", "row_strided")))
    soft = draw(st.booleans())
    huge = inp["offset"] >= 1e6 or inp["scale"] >= 300
    return dict(seed=draw(st.integers(0, 2 ** 20)), input=inp, soft=soft, backend=backend,
                bounds=tuple(draw(st.lists(st.integers(0, c), max_size=3))),
                weight=draw(st.sampled_from((None, "positive", "with_zeros"))),
                ignored_every=draw(st.sampled_from((0, 2))),
                target_sharpness=draw(st.sampled_from((1.0, 100.0))),
                kwargs=dict(ignore_index=-100,
                            label_smoothing=draw(st.sampled_from((0.0, 0.1, 0.6))),
                            z_loss=0.0 if huge else draw(st.sampled_from((0.0, 0.01))),
                            softcap=draw(st.sampled_from((None, 3.0, 1e4)))))
