"""The worked FSDP2 example of docs/distributed.md runs as written on 2 spawned ranks (its
own final check: the run resumed from the checkpoint equals the uninterrupted one bit for
bit), and its params equal torch.optim.AdamW + clip_grad_norm_ on the unsharded model."""

import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _harness import backend_skip_reason, rank_pool

DOC = Path(__file__).resolve().parents[2] / "docs" / "distributed.md"
MARKER = "<!-- the FSDP2 example: tests/distributed/test_docs_example.py runs it -->"


def example_code() -> str:
    text = DOC.read_text()
    block = re.search(re.escape(MARKER) + r"\s*```python\n(.*?)```", text, re.S)
    assert block is not None, f"no example after {MARKER!r} in {DOC}"
    return block.group(1)


def run_example(rank, world, workdir):
    cwd = os.getcwd()
    os.chdir(workdir)  # the example writes ./checkpoint
    try:
        namespace = {"__name__": "__main__"}
        exec(compile(example_code(), str(DOC), "exec"), namespace)
    finally:
        os.chdir(cwd)
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 10))
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1, foreach=False)
    for step in range(10):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
        F.cross_entropy(ref(x), y, label_smoothing=0.1).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
    assert float(norm) > 0.5  # clipping was active
    for p, r in zip(namespace["model"].parameters(), ref.parameters()):
        torch.testing.assert_close(p.full_tensor(), r.detach(), rtol=2e-5, atol=2e-6)
    return True


def test_fsdp2_example_of_the_docs_runs_and_matches_torch(tmp_path):
    reason = backend_skip_reason("gloo", 2)
    if reason is not None:
        pytest.skip(reason)
    example_code()  # found before any rank starts
    assert rank_pool(2, "gloo").run(run_example, str(tmp_path)) == [True, True]
