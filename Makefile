# Two commands set up a fresh machine:
#   make demo   install, generate the offline demo, run it end to end, print the table, write its report
#   make test   install and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch that this project pins; installed first so nothing pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench bench-scale gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: install
	$(BIN)/dpr-hpc generate-demo data/demo
	$(BIN)/dpr-hpc submit jobs/demo.yaml --backend local
	$(BIN)/dpr-hpc collect jobs/demo.yaml --median
	$(BIN)/dpr-hpc report jobs/demo.yaml --baseline BERT-64

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Our stage code vs the paper's way of running, on this node (about 10 min on 2 CPU cores).
bench: install
	$(BIN)/dpr-hpc bench

# Every stage phase at NQ's size on NQ-shaped data, each in its own process: time, peak RSS,
# disk (about 30 min and 10 GB of scratch on 2 CPU cores).
bench-scale: install
	$(BIN)/dpr-hpc bench --scale

# The paper's GPU figures at real model sizes, the GPU capped at 24 GB; needs a CUDA GPU
# (about 8 min on an H100). `dpr-hpc gpu-check --smoke` checks the script on the CPU.
gpu-check: install
	$(BIN)/dpr-hpc gpu-check

# Build output and the demo only: runs/ holds days of GPU results, which are deleted on purpose,
# by hand, never by a make target.
clean:
	rm -rf build dist *.egg-info .pytest_cache runs/demo data/demo results/demo.csv results/demo.md \
		results/demo-median.csv results/demo-median.md results/demo/
	find . -name __pycache__ -type d -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
	@echo "make clean: removed build output and the demo (runs/demo, data/demo, results/demo/)."
	@echo "Other run folders in runs/ are kept; delete one on purpose with: rm -rf runs/<grid name>"
