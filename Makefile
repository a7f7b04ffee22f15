# Set-up and the two commands of the README: `make demo` and `make test`.
# Needs nothing but Python 3.10+ with venv; everything goes into .venv/ in the repo.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sam2pal-installed
CORES ?= all

# Every pip call below is pinned by constraints.txt (torch above all: an unpinned
# torch pulls a multi-GB CUDA build).
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test lint clean-demo review-tools gpu-kit

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet setuptools wheel "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# sam2 is a source package: build it against the torch above, without its CUDA-only
	# torchvision (which would break `import peft`), and without the CUDA extension.
	SAM2_BUILD_CUDA=0 $(BIN)/python -m pip install --quiet --no-build-isolation --no-deps "sam2==1.1.0"
	$(BIN)/python -c "import torch, sam2, peft, sam2pal; print('sam2pal', sam2pal.__version__, 'with torch', torch.__version__)"
	touch $(STAMP)

demo: install
	$(BIN)/snakemake --cores $(CORES)
	@echo "Demo finished: see results/demo/ (predictions.json, provenance.json, measurements.csv, qc.csv, overlays/)"
	@echo "HTML report: $(BIN)/snakemake --report report.html"

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/snakemake --lint

# The review tools the tests drive from the outside: a Label Studio server, and Datumaro
# (the library CVAT imports and exports with). Each gets a venv of its own under
# .venv-tools/: they pin their own opencv, pandas and friends, which .venv's
# constraints.txt does not allow, and label-studio and datumaro cannot share one either
# (their pyarrow ranges do not meet). Versions: tools-constraints.txt.
TOOLS ?= .venv-tools
TOOLS_PIP = PIP_CONSTRAINT=$(CURDIR)/tools-constraints.txt

review-tools: $(TOOLS)/labelstudio/.installed $(TOOLS)/datumaro/.installed

$(TOOLS)/labelstudio/.installed: tools-constraints.txt
	test -x $(TOOLS)/labelstudio/bin/python || $(PYTHON) -m venv $(TOOLS)/labelstudio
	$(TOOLS_PIP) $(TOOLS)/labelstudio/bin/python -m pip install --quiet label-studio label-studio-sdk
	$(TOOLS)/labelstudio/bin/python -c "import label_studio; print('label-studio', label_studio.__version__)"
	touch $@

$(TOOLS)/datumaro/.installed: tools-constraints.txt
	test -x $(TOOLS)/datumaro/bin/python || $(PYTHON) -m venv $(TOOLS)/datumaro
	$(TOOLS_PIP) $(TOOLS)/datumaro/bin/python -m pip install --quiet datumaro
	$(TOOLS)/datumaro/bin/python -c "import datumaro; print('datumaro', datumaro.__version__)"
	touch $@

# Wheels for a machine whose Python has PyTorch, NumPy, OpenCV and Pillow but nothing else
# of ours and no package index (a lent GPU machine: Python 3.12, x86-64). The source-only
# packages are built here as pure-Python wheels; the others are downloaded for cp312.
# Versions: constraints.txt (antlr4's is omegaconf's). Used by scripts/pretrain_gpu.sh.
GPU_PYTHON ?= 3.12
KIT ?= .whl
GPU_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64,--platform $(p))
gpu-kit: install
	rm -rf $(KIT) && mkdir -p $(KIT)
	SAM2_BUILD_CUDA=0 $(BIN)/python -m pip wheel --quiet --no-deps --no-build-isolation -w $(KIT) \
		sam2 iopath "antlr4-python3-runtime==4.9.3"
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) \
		--implementation cp $(GPU_PLATFORMS) -d $(KIT) \
		hydra-core omegaconf pycocotools ijson
	ls $(KIT)

clean-demo:
	rm -rf results/demo logs/demo results/demo_video logs/demo_video
