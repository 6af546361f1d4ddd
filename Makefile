# The two commands of the README contract:
#   make demo   set up .venv, build, run the main job
#   make test   set up .venv, build, run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
CUDA_VENV ?= .venv-cuda
CUDA_TORCH_VERSION ?= 2.14.1
STAMP  := $(VENV)/.robustops-built

.PHONY: test demo report-check setup build wheel sdist bench bench-quick cuda-check clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# torch first (the CPU wheel), then the extension built against it without build isolation.
$(STAMP): $(VENV)/bin/python setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q ninja numpy scipy scikit-learn
	$(PIP) install -q --no-build-isolation -e ".[test]"
	@# Peer library for the equality tests only (its torchvision dependency would pull a CUDA torch,
	@# so --no-deps); best effort: those tests skip when it is absent.
	-$(PIP) install -q --no-deps torchattacks==3.5.1 || echo "torchattacks not installed: its tests will be skipped"
	@# robustops.xai: the [xai] extra (UMAP, plots), then its test peers (best effort, --no-deps: see pyproject)
	-$(PIP) install -q umap-learn matplotlib || echo "umap-learn not installed: the UMAP test will be skipped"
	-$(PIP) install -q --no-deps --ignore-requires-python zennit==1.0.0 grad-cam==1.5.7 ttach opencv-python-headless || echo "xai peers not installed: their tests will be skipped"
	@# The authors' AutoAttack code (fra31/auto-attack, packaged on PyPI) for the AutoAttack comparison tests
	@# and benchmark; best effort: those tests skip when it is absent.
	-$(PIP) install -q --no-deps pyautoattack==0.2.0 || echo "pyautoattack not installed: its tests will be skipped"
	touch $(STAMP)

setup: $(STAMP)
build: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The [xai] extra (umap-learn, matplotlib) for the report's figures and UMAP, read from pyproject.toml.
XAI_STAMP := $(VENV)/.robustops-xai
$(XAI_STAMP): $(STAMP) pyproject.toml
	$(PIP) install -q $$($(PY) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['xai']))")
	touch $(XAI_STAMP)

# The main job: the robustness report of the embedded default into report/ (index.html, PNGs, results.json).
demo: $(XAI_STAMP)
	$(PY) -m robustops.cli report --out report

# Render report/index.html in headless Chromium (apt-get install chromium): every figure loaded,
# every section present, screenshot report/screenshot.png. Runs `make demo` first when needed.
report-check:
	@test -f report/index.html || $(MAKE) demo
	$(PY) scripts/report_check.py report

bench: $(STAMP)
	$(PY) benchmarks/run.py

bench-quick: $(STAMP)
	$(PY) benchmarks/run.py --quick

# Release check: sdist + wheel (the sdist must build the same wheel), auditwheel repair into a
# manylinux tag (torch's libraries excluded), install into a fresh venv (torch from disk), run every
# op and `robustops info`; prints the wheel's name, size and tag. Output: dist/, wheelhouse/.
wheel: $(STAMP)
	bash scripts/check_wheel.sh $(PY) $(TORCH_VERSION)

# The source distribution alone (dist/robustops-<version>.tar.gz); `make wheel` also checks it.
sdist: $(STAMP)
	$(PIP) install -q build
	$(PY) -m build --sdist --no-isolation --outdir dist .

# Compile the CUDA sources without a GPU: a separate venv with the CUDA build of torch + nvcc.
cuda-check:
	bash scripts/cuda_check.sh $(CUDA_VENV) $(CUDA_TORCH_VERSION)

clean:
	rm -rf build dist wheelhouse *.egg-info robustops/_C*.so robustops/_build_meta.py $(STAMP)
