"""The benchmark cases, shared by `python -m fusedopt bench` and benchmarks/*.py.

A `Case` is one op at one size and dtype on one device: how to make its inputs (shared by
all its candidates), how many bytes one call moves (the op's byte model), and its
`Candidate`s -- fusedopt on every backend usable here, and the baselines. A candidate's
``build(inputs)`` returns a zero-argument callable that runs the op once (a loss
forward+backward, or an optimizer step), or raises `baselines.Skip` with the reason.

Byte models (bytes one call must move at least; GB/s = bytes / median time):
* cross_entropy, focal_loss: 2 reads + 1 write of the logits = 3 * N * C * elem_size
  (forward reads the logits, the fused pass writes the gradient, backward is free);
* sigmoid_focal_loss: read logits and targets, write the gradient = 3 * numel * elem_size;
* adam, adamw (fp32): read p, g, m, v and write p, m, v = 28 B/param;
* sgd with momentum (fp32): read p, g, buf and write p, buf = 20 B/param;
* adamw_amp_clip (fp32, loss scale + global-norm clip): 28 + 4 (g read again for the
  norm) = 32 B/param;
* step_host: host time of step() on 1,000 small tensors; no byte model;
* linear_cross_entropy: bound by its three GEMMs of 2*N*V*H flops each, not by memory;
  no byte model (the "GEMMs alone" baseline is its floor).
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch

import fusedopt
from fusedopt import backends
from fusedopt.bench import baselines as bl
from fusedopt.bench.timing import DEVICE_TIME, HOST_TIME, free_memory

FUSEDOPT, BASELINE = "fusedopt", "baseline"

LOSS_OPS = ("cross_entropy", "focal_loss", "sigmoid_focal_loss")
LINEAR_OPS = ("linear_cross_entropy",)
OPTIM_OPS = ("adam", "adamw", "sgd", "adamw_amp_clip", "step_host")
OPS = LOSS_OPS + LINEAR_OPS + OPTIM_OPS

# The backend op (backends.OPS) each benchmark op runs on.
BACKEND_OP = {"cross_entropy": "cross_entropy", "focal_loss": "focal_loss",
              "sigmoid_focal_loss": "sigmoid_focal_loss", "adam": "adam", "adamw": "adam",
              "sgd": "sgd", "adamw_amp_clip": "adam", "step_host": "adam",
              "linear_cross_entropy": "cross_entropy"}

LABEL_SMOOTHING = 0.1
FOCAL_GAMMA, SIGMOID_ALPHA = 2.0, 0.25
BYTES_PER_PARAM = {"adam": 28, "adamw": 28, "sgd": 20, "adamw_amp_clip": 32}

# Sizes per device type and size set: loss shapes (rows, classes), loss dtype, optimizer
# parameter count, number of tensors of the step_host model; linear cross-entropy shapes
# (rows N, hidden H, classes V) and their dtype.
_F32, _BF16 = torch.float32, torch.bfloat16
SIZES = {
    "cpu": {
        "full": dict(loss=[(4096, 32000)], dtype=_F32, params=75_000_000, host_tensors=1000,
                     linear=[(8192, 256, 32000)], linear_dtype=_F32),
        "quick": dict(loss=[(1024, 8000)], dtype=_F32, params=5_000_000, host_tensors=1000,
                      linear=[(2048, 128, 8000)], linear_dtype=_F32),
        "tiny": dict(loss=[(64, 512)], dtype=_F32, params=100_000, host_tensors=100,
                     linear=[(64, 16, 256)], linear_dtype=_F32),
    },
    "cuda": {
        "full": dict(loss=[(8192, 32768), (8192, 131072), (8192, 262144)], dtype=_BF16,
                     params=1_000_000_000, host_tensors=1000,
                     linear=[(8192, 4096, 32000), (8192, 4096, 128256)], linear_dtype=_BF16),
        "quick": dict(loss=[(8192, 32768)], dtype=_BF16, params=100_000_000, host_tensors=1000,
                      linear=[(8192, 4096, 128256)], linear_dtype=_BF16),
        "tiny": dict(loss=[(256, 1000)], dtype=_BF16, params=100_000, host_tensors=100,
                     linear=[(256, 64, 1000)], linear_dtype=_BF16),
    },
}
SIZE_SETS = ("full", "quick", "tiny")
# Sigmoid focal (multi-label) materialises several full-size temporaries in eager mode:
# its largest GPU shape is left out.
SIGMOID_MAX_NUMEL = 8192 * 131072


@dataclass
class Candidate:
    name: str                                    # "fusedopt[cpu]", "torch eager", ...
    kind: str                                    # FUSEDOPT or BASELINE
    build: Callable[[dict], Callable[[], object]]
    backend: str | None = None                   # fusedopt backend name


@dataclass
class Case:
    op: str
    label: str                 # op plus its variant, e.g. "cross_entropy ls=0.1"
    shape: str
    dtype: torch.dtype
    device: torch.device
    bytes_per_run: int | None
    byte_model: str
    make_inputs: Callable[[], dict]
    candidates: list[Candidate] = field(default_factory=list)
    metric: str = DEVICE_TIME
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (candidate, reason)
    notes: list[str] = field(default_factory=list)
    _inputs: dict | None = None

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def group(self) -> str:
        return f"{self.label} | {self.dtype_name} | {self.shape}"

    @property
    def ident(self) -> str:
        text = f"{self.label}-{self.dtype_name}-{self.shape}"
        return re.sub(r"[^A-Za-z0-9_.=]+", "-", text).strip("-")

    def inputs(self) -> dict:
        if self._inputs is None:
            self._inputs = self.make_inputs()
        return self._inputs

    def release(self) -> None:
        self._inputs = None
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- fusedopt backends

def fusedopt_backends(op: str, device: torch.device,
                      only: str | None) -> tuple[list[str], list[tuple[str, str]]]:
    """(backends to benchmark, [(candidate, reason)] left out) for one op on ``device``.

    Every backend that is not benchmarked is listed with its reason (not built, no device,
    no kernel for the op, another device type, not asked for), so a missing column in the
    table is never silent."""
    backend_op = BACKEND_OP[op]
    names, left_out = [], []
    for name in backends.NAMES:
        ok, reason = backends._usable(name, backend_op, device)
        if only is not None and name != only:
            continue
        if not ok:
            left_out.append((f"fusedopt[{name}]", reason))
        elif device.type == "cpu" and name == "triton":
            left_out.append(("fusedopt[triton]", "TRITON_INTERPRET=1 on CPU is an interpreter; "
                                                 "its timings are meaningless, not benchmarked"))
        else:
            names.append(name)
    return names, left_out


# ----------------------------------------------------------------------------- losses

_FO_LOSS = {
    "cross_entropy": lambda ls: partial(fusedopt.cross_entropy, label_smoothing=ls),
    "focal_loss": lambda ls: partial(fusedopt.focal_loss, gamma=FOCAL_GAMMA),
    "sigmoid_focal_loss": lambda ls: partial(fusedopt.sigmoid_focal_loss, alpha=SIGMOID_ALPHA,
                                             gamma=FOCAL_GAMMA, reduction="mean"),
}
_EAGER_LOSS = {
    "cross_entropy": bl.cross_entropy_eager,
    "focal_loss": lambda ls: bl.focal_eager(FOCAL_GAMMA),
    "sigmoid_focal_loss": lambda ls: bl.sigmoid_focal_eager(SIGMOID_ALPHA, FOCAL_GAMMA),
}


def _loss_inputs(op, rows, classes, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(rows, classes, generator=gen, dtype=dtype, device=device).mul_(2)
    logits.requires_grad_()
    if op == "sigmoid_focal_loss":
        target = (torch.rand(rows, classes, generator=gen, device=device) < 0.01).to(dtype)
    else:
        target = torch.randint(0, classes, (rows,), generator=gen, device=device)
    return {"logits": logits, "target": target}


def _fo_loss_build(op, ls, backend):
    def build(inp):
        fn = partial(_FO_LOSS[op](ls), backend=backend)
        return bl.loss_step(fn, inp["logits"], inp["target"])
    return build


def _loss_case(op, ls, rows, classes, dtype, device, only, use_compile):
    label = op if not ls else f"{op} ls={ls:g}"
    elem = torch.tensor([], dtype=dtype).element_size()
    model = ("read logits + targets, write grad: 3*numel*s" if op == "sigmoid_focal_loss"
             else "2 reads + 1 write of the logits: 3*N*C*s")
    case = Case(op, label, f"{rows}x{classes}", dtype, device, 3 * rows * classes * elem, model,
                partial(_loss_inputs, op, rows, classes, dtype, device))
    names, case.skipped = fusedopt_backends(op, device, only)
    free = free_memory(device) if torch.cuda.is_available() else None
    if free is not None and 8 * case.bytes_per_run // 3 > free:
        logits_gib = case.bytes_per_run // 3 / 2**30
        case.notes.append(f"{case.group}: needs about 8x the logits' {logits_gib:.1f} GiB, "
                          f"{free / 2**30:.1f} GiB free; not run")
        return case
    for name in names:
        case.candidates.append(Candidate(f"fusedopt[{name}]", FUSEDOPT,
                                         _fo_loss_build(op, ls, name), name))
    eager = _EAGER_LOSS[op](ls)
    baselines = {"torch eager": lambda x, t: bl.loss_step(eager, x, t)}
    if use_compile:
        baselines["torch.compile"] = lambda x, t: bl.compiled_loss_step(eager, x, t)
    else:
        case.skipped.append(("torch.compile", "disabled (--no-compile)"))
    if op == "cross_entropy":
        baselines["liger"] = lambda x, t: bl.liger_cross_entropy_step(x, t, ls)
        baselines["apex"] = lambda x, t: bl.apex_cross_entropy_step(x, t, ls)
    for name, make in baselines.items():
        case.candidates.append(Candidate(
            name, BASELINE, (lambda m: lambda inp: m(inp["logits"], inp["target"]))(make)))
    return case


# ----------------------------------------------------------------------------- linear CE

GEMM_FLOOR, TORCH_CHUNKED = "GEMMs alone (floor)", "torch chunked"


def _linear_ce_inputs(rows, hidden, classes, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, hidden, generator=gen, device=device).to(dtype).requires_grad_()
    weight = torch.randn(classes, hidden, generator=gen, device=device).mul_(hidden ** -0.5)
    target = torch.randint(0, classes, (rows,), generator=gen, device=device)
    return {"x": x, "weight": weight.to(dtype).requires_grad_(), "target": target}


def _linear_ce_case(rows, hidden, classes, dtype, device, only):
    """fusedopt.linear_cross_entropy (mean) forward + backward (gradients of x and W)."""
    op = "linear_cross_entropy"
    model = "GEMM-bound: 3 GEMMs of 2*N*V*H flops; no byte model"
    case = Case(op, op, f"N{rows} H{hidden} V{classes}", dtype, device, None, model,
                partial(_linear_ce_inputs, rows, hidden, classes, dtype, device))
    names, case.skipped = fusedopt_backends(op, device, only)
    logits = rows * classes * torch.tensor([], dtype=dtype).element_size()
    free = free_memory(device) if torch.cuda.is_available() else None
    if free is not None and 6 * logits > free:
        case.notes.append(f"{case.group}: the eager baseline needs about 6x the logits' "
                          f"{logits / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free; not run")
        return case
    for name in names:
        step = (lambda b: lambda x, w, t: bl._linear_ce_step(
            partial(fusedopt.linear_cross_entropy, backend=b), x, w, t))(name)
        case.candidates.append(Candidate(f"fusedopt[{name}]", FUSEDOPT, step, name))
    baselines = {"torch eager": bl.linear_ce_eager_step,
                 TORCH_CHUNKED: bl.linear_ce_torch_chunked_step,
                 GEMM_FLOOR: bl.linear_ce_gemm_floor, "liger": bl.liger_linear_ce_step}
    for name, make in baselines.items():
        case.candidates.append(Candidate(name, BASELINE, make))
    for cand in case.candidates:   # every builder takes the case's inputs as keywords
        cand.build = (lambda make: lambda inp: make(inp["x"], inp["weight"], inp["target"]))(
            cand.build)
    return case


# ----------------------------------------------------------------------------- optimizers

def model_shapes(total: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a 12-layer transformer-like model of about ``total`` params:
    per layer qkv, out, fc1, fc2 weights + biases and two layer norms (12 tensors), topped
    up with an embedding table (d: the largest multiple of 8 that keeps the layers within
    the total)."""
    layers = 12
    d = max(8, int(math.sqrt(total / (12 * layers)) / 8) * 8)
    layer = [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,),
             (d,), (d,), (d,), (d,)]
    shapes = layer * layers
    used = sum(math.prod(s) for s in shapes)
    if total - used >= d:
        shapes = [((total - used) // d, d)] + shapes
    return shapes


def host_model_shapes(count: int) -> list[tuple[int, ...]]:
    """``count`` small tensors (256 to 4096 elements) for the step() host-time case."""
    pattern = [(256,), (64, 64), (128, 32), (1024,), (32, 48)]
    return [pattern[i % len(pattern)] for i in range(count)]


def _optim_inputs(shapes, device):
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen, device=device).mul_(0.02).requires_grad_()
        p.grad = torch.randn(shape, generator=gen, device=device).mul_(1e-2)
        params.append(p)
    return {"params": params}


def _fo_optimizer(kind, params, backend, **extra):
    cls = {"adam": fusedopt.optim.FusedAdam, "adamw": fusedopt.optim.FusedAdamW,
           "sgd": fusedopt.optim.FusedSGD}[kind]
    return cls(params, **bl.OPTIMIZER_KWARGS[kind], backend=backend, **extra)


def _fo_amp_clip_step(params, backend):
    opt = _fo_optimizer("adamw", params, backend, max_grad_norm=bl.MAX_GRAD_NORM)
    scaler = fusedopt.amp.LossScaler(**bl.SCALER_KWARGS)
    scaler.scale(torch.ones((), device=params[0].device))  # creates the scale tensor

    def run():
        scaler.step(opt)
        scaler.update()
    return run


def _optim_candidates(op, names, device):
    kind = "adamw" if op in ("adamw_amp_clip", "step_host") else op
    out = []
    for name in names:
        if op == "adamw_amp_clip":
            build = (lambda b: lambda inp: _fo_amp_clip_step(inp["params"], b))(name)
        else:
            build = (lambda b: lambda inp: _fo_optimizer(kind, inp["params"], b).step)(name)
        out.append(Candidate(f"fusedopt[{name}]", FUSEDOPT, build, name))
    cls = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}[kind]
    for impl in ("foreach", "fused"):
        if op == "adamw_amp_clip":
            name = f"torch amp+clip+AdamW({impl})"
            build = (lambda i: lambda inp: bl.torch_amp_clip_step(inp["params"], i))(impl)
        else:
            name = f"torch {cls}({impl})"
            build = (lambda i: lambda inp: bl.torch_optimizer_step(kind, inp["params"], i))(impl)
        out.append(Candidate(name, BASELINE, build))
    if op in ("adam", "adamw", "sgd"):
        out.append(Candidate("apex", BASELINE,
                             lambda inp: bl.apex_optimizer_step(kind, inp["params"])))
    return out


def _fit_params(op, target, n_candidates, device):
    """Shrink ``target`` so that the shared p and g, every candidate's state and the largest
    step's temporaries fit in 80% of the free GPU memory; returns (params, note or None)."""
    free = free_memory(device) if torch.cuda.is_available() else None
    if free is None:
        return target, None
    state = 4 if op == "sgd" else 8
    per_param = 8 + n_candidates * state + 8     # p, g; states; one step's temporaries
    fits = int(0.8 * free / per_param)
    if fits >= target:
        return target, None
    return fits, (f"{op}: {target / 1e6:.0f}M params do not fit in {free / 2**30:.1f} GiB free "
                  f"with {n_candidates} candidates; shrunk to {fits / 1e6:.0f}M")


def _optim_case(op, size, device, only):
    names, left_out = fusedopt_backends(op, device, only)
    candidates = _optim_candidates(op, names, device)
    if op == "step_host":
        shapes = host_model_shapes(size["host_tensors"])
        bytes_per_param, metric, note = None, HOST_TIME, None
        model = "host time of step(); no byte model"
    else:
        apex_missing = importlib.util.find_spec("apex") is None
        holders = [c for c in candidates if not (c.name == "apex" and apex_missing)]
        target, note = _fit_params(op, size["params"], len(holders), device)
        shapes = model_shapes(target)
        bytes_per_param, metric = BYTES_PER_PARAM[op], DEVICE_TIME
        model = {28: "read p,g,m,v + write p,m,v: 28 B/param",
                 20: "read p,g,buf + write p,buf: 20 B/param",
                 32: "g read twice (norm + update), p,m,v read+written: 32 B/param",
                 }[bytes_per_param]
    n_params = sum(math.prod(s) for s in shapes)
    shape = f"{n_params / 1e6:.2f}M params in {len(shapes)} tensors"
    case = Case(op, op, shape, torch.float32, device,
                None if bytes_per_param is None else bytes_per_param * n_params, model,
                partial(_optim_inputs, shapes, device), candidates, metric, left_out)
    if note:
        case.notes.append(note)
    return case


# ----------------------------------------------------------------------------- all cases

def build_cases(device: torch.device | str, sizes: str = "full", ops=None,
                backend: str | None = None, use_compile: bool = True, loss_shapes=None,
                smoothings=None) -> list[Case]:
    """Every case of ``ops`` (default: all of `OPS`) at size set ``sizes`` on ``device``.

    ``loss_shapes`` ([(rows, classes)]) replaces the loss shapes of the size set;
    ``smoothings`` (label-smoothing values) the cross-entropy variants, 0 and 0.1."""
    device = torch.device(device)
    if sizes not in SIZE_SETS:
        raise ValueError(f"sizes must be one of {', '.join(SIZE_SETS)}, got {sizes!r}")
    ops = list(OPS if ops is None else ops)
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"unknown benchmark op(s) {', '.join(unknown)}; "
                         f"expected some of {', '.join(OPS)}")
    size = SIZES["cuda" if device.type == "cuda" else "cpu"][sizes]
    smoothings = tuple((0.0, LABEL_SMOOTHING) if smoothings is None else smoothings)
    cases = []
    for op in OPS:
        if op not in ops:
            continue
        if op in LINEAR_OPS:
            for rows, hidden, classes in size["linear"]:
                cases.append(_linear_ce_case(rows, hidden, classes, size["linear_dtype"],
                                             device, backend))
        elif op in LOSS_OPS:
            for rows, classes in loss_shapes or size["loss"]:
                if op == "sigmoid_focal_loss" and rows * classes > SIGMOID_MAX_NUMEL:
                    continue
                for ls in smoothings if op == "cross_entropy" else (0.0,):
                    cases.append(_loss_case(op, ls, rows, classes, size["dtype"], device,
                                            backend, use_compile))
        else:
            cases.append(_optim_case(op, size, device, backend))
    return cases
