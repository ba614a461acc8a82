"""Benchmarks of the fusedopt kernels against PyTorch baselines.

* `cases` -- the benchmark cases (inputs, byte models, candidates), shared by the command
  line and the pytest-benchmark suite in benchmarks/;
* `baselines` -- torch eager / torch.compile / torch.optim / Liger / apex candidates;
* `timing` -- interleaved median timing, copy bandwidth, peak memory;
* `report` -- rows, the table, the JSON document, the plot;
* `cli` -- `python -m fusedopt bench` (``main(argv) -> int``).

See docs/benchmarks.md.
"""
