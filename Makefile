# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= demo-out

.PHONY: demo test install bench clean

# torch==2.13.0 is the CPU build on this machine; an unpinned torch pulls CUDA wheels.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m edgesnn build --private --binary --budget fast --out $(DEMO_OUT) --eval-data packaged
	$(MAKE) -s -C $(DEMO_OUT)/c check

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/convert_fmnist.py
	$(PY) bench/private_binary_fmnist.py --cifar --keep bench/builds
	$(PY) bench/export_fmnist.py --builds bench/builds

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
