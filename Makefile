# The two commands of the README. Each creates .venv if missing, installs the pinned stack
# (requirements-dev.txt) and the package (building the optional compiled extension), then runs.
#   make test    the whole test suite (CPU; Triton kernels under TRITON_INTERPRET=1)
#   make bench   the benchmark suite (benchmarks/run.py): prints the tables, writes results.json,
#                summary.md and plots to benchmarks/out/<machine>/; BENCH_ARGS=--quick: < 1 minute
#   make lint    ruff over the repository (configuration in pyproject.toml)
#   make test-timm  timm's own CrossViT model tests (from timm's source distribution, cached in
#                .timm-tests/) with timm's, the patched and our models (tests/timm_compat/plugin.py)
# Variables: PYTHON (interpreter that creates the venv), PYTEST_ARGS, BENCH_ARGS, TIMM_IMPLS (the
# test-timm modes), TIMM_TESTS_K (its test selection), TIMM_PYTEST_ARGS,
# CROSSVIT_KERNELS_NO_EXT=1 (skip the extension build), MAX_JOBS (build parallelism),
# TRITON_COMPAT (the Triton release of the GPU machine; `make test` installs it under
# .triton-compat/ and also compiles the kernels for sm_90 with it; empty to skip).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export MAX_JOBS ?= 2

EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu csrc/*.cuh)
TRITON_COMPAT ?= 3.6.0
COMPAT_STAMP := $(if $(TRITON_COMPAT),.triton-compat/$(TRITON_COMPAT)/.stamp)

.PHONY: test test-timm bench lint install info clean

$(VENV)/.deps-stamp: requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements-dev.txt
	@touch $@

$(VENV)/.pkg-stamp: $(VENV)/.deps-stamp setup.py pyproject.toml $(EXT_SOURCES)
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	@touch $@

install: $(VENV)/.pkg-stamp

# A second Triton for the compile-only tests (no GPU needed). A failed download warns and the tests
# then check the bundled Triton only; they name each install they compile with.
.triton-compat/%/.stamp: $(VENV)/.deps-stamp
	@rm -rf .triton-compat/$*
	@if $(PIP) install --quiet --no-deps --target .triton-compat/$* triton==$*; then touch $@; \
	else echo "warning: could not install triton==$* into .triton-compat/$*: its compile-only checks are skipped"; fi

test: install $(COMPAT_STAMP)
	$(PY) -m crossvit_kernels.info
	$(PY) -m pytest tests $(PYTEST_ARGS)

# timm's test file matches the pinned timm release
TIMM_VERSION := $(shell sed -n 's/^timm==//p' requirements-dev.txt)
TIMM_TESTS := .timm-tests/timm-$(TIMM_VERSION)/test_models.py
TIMM_IMPLS ?= timm patched ours
TIMM_TESTS_K ?= crossvit and not load_pretrained

$(TIMM_TESTS): | $(VENV)/.deps-stamp
	$(PY) tests/timm_compat/fetch_tests.py $(TIMM_VERSION) .timm-tests

# Every mode runs; the target fails if any failed (failures not in tests/timm_compat/xfail_*.txt,
# or listed tests that now pass). A one-line result per mode is printed at the end.
test-timm: install $(TIMM_TESTS)
	@: > .timm-tests/summary.txt; status=0; \
	for impl in $(TIMM_IMPLS); do \
		$(PY) -m pytest $(TIMM_TESTS) -p tests.timm_compat.plugin --crossvit-impl=$$impl \
			--crossvit-summary=.timm-tests/summary.txt -k "$(TIMM_TESTS_K)" $(TIMM_PYTEST_ARGS) || status=1; \
	done; \
	cat .timm-tests/summary.txt; exit $$status

bench: install
	$(PY) benchmarks/run.py $(BENCH_ARGS)

lint: $(VENV)/.deps-stamp
	$(VENV)/bin/ruff check .

info: install
	$(PY) -m crossvit_kernels.info

clean:
	rm -rf build *.egg-info crossvit_kernels/*.so benchmarks/out $(VENV)/.pkg-stamp .triton-compat .timm-tests
