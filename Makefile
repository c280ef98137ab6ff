# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# An empty PIP_FIND_LINKS keeps pip off locally cached CPU-only torch wheels (they break torchvision).
PIP := PIP_FIND_LINKS= $(VENV)/bin/pip

.PHONY: setup lint demo demo-efficient demo-generator demo-generator-fashion generator-sweep generator-variants detection-teacher demo-detection data-fashion bench-wild-teacher bench-wild bench-wild-quick bench bench-gpu report docs test test-fast faults clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q -e '.[dev]'
	touch $@

demo: setup
	$(PY) -m vitkd.demos.pipeline

# Efficient-ViT toolbox: GTP/ToMe/IdleViT on the digits teacher, shuffle/plain/projector students.
demo-efficient: setup
	$(PY) -m vitkd.demos.efficient

# Data-free routes (DAFL, transformer GAN, hybrid, fast synthesizer), 3 seeds each, from the digits teacher.
demo-generator: setup
	$(PY) -m vitkd.demos.generators

# The same routes from the Fashion-MNIST benchmark's teacher (make bench-wild-teacher first).
demo-generator-fashion: setup
	$(PY) -m vitkd.demos.generators --teacher fashion

# DAFL at its reference settings over generator-step budgets, ViT and CNN teachers (results JSON committed).
generator-sweep: setup
	$(PY) -m vitkd.demos.generator_sweep

# The transformer-generator designs tried, compared on the labelled validation split.
generator-variants: setup
	$(PY) -m vitkd.demos.generator_variants

# The DETR teacher on the embedded aerial set, trained once (runs/detection-teacher/); demo-detection reuses it.
detection-teacher: setup
	$(PY) -m vitkd.demos.detection --teacher_only

# DETR teacher -> lighter DETR student variants (3 seeds each) on the embedded aerial set.
demo-detection: detection-teacher
	$(PY) -m vitkd.demos.detection

# Fashion-MNIST: $FASHION_MNIST_DIR, Debian's dataset-fashion-mnist, or apt-get as root;
# then the benchmark's wild pool, built once under data/ (its shard URL is printed).
data-fashion: setup
	$(PY) -m data_modules.fashion_pool

# The real-data benchmark (docs/fashion-benchmark.md): its teacher once, then selections and students.
bench-wild-teacher: data-fashion
	test -f runs/bench-wild/teacher/metrics.json || $(PY) -m vitkd.fit --config experiments/fashion/teacher.yaml --run_dir runs/bench-wild/teacher --trainer.enable_progress_bar false

bench-wild: bench-wild-teacher
	$(PY) -m vitkd.demos.bench_wild

bench-wild-quick: bench-wild-teacher
	$(PY) -m vitkd.demos.bench_wild --quick

# Speed and memory figures, written to benchmarks/results/<machine>-<date>.json.
bench: setup
	$(PY) -m benchmarks.bench

# The GPU benchmark (docs/gpu-bench.md), for a machine with no internet: the venv's python if there is one, else
# python3; no setup. Writes benchmarks/results/gpu-<device>-<date>.json.
BENCH_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
bench-gpu:
	$(BENCH_PY) -m benchmarks.gpu

# Comparison table and plots of the demo's runs (runs/demo/comparison/).
report: setup
	$(PY) -m vitkd.report runs/demo/*

# The result tables of README.md and docs/*.md, rewritten from the committed results JSON (benchmarks/results/).
docs: setup
	$(PY) -m vitkd.demos.tables

# Lint and format check (ruff, configured in pyproject.toml); CI runs it before the tests.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup
	$(PY) -m pytest -q -m "not soak"

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not soak"

# Fault injection (docs/reliability.md): the fault tests plus the soak (kills at random points of each stage);
# prints the table of faults, also written to runs/faults/summary.json.
faults: setup
	$(PY) -m pytest -q tests/test_faults.py

clean:
	rm -rf runs data lightning_logs
