# Two entry points for a fresh machine (Python 3.10+, a C++ compiler; nvcc optional):
#   make demo   -- venv, install, train a small classifier with fusedopt, quick benchmark
#   make test   -- venv, install with test extras, run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

.PHONY: install install-test demo test
install: $(PY)
	$(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install ".[triton]"

install-test: $(PY)
	$(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install ".[test]"

# run from inside the venv folder: `python -m` puts the working directory first on sys.path,
# and from the checkout it would import the unbuilt source tree instead of the installed package
demo: install
	cd $(VENV) && bin/python -m fusedopt info
	cd $(VENV) && bin/python -m fusedopt demo
	cd $(VENV) && bin/python -m fusedopt bench --quick

test: install-test
	TRITON_INTERPRET=1 $(VENV)/bin/pytest -q
