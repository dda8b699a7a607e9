# Two entry points: `make demo` (the main job end to end, CPU, offline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist
DEMO_OUT ?= runs/demo

.PHONY: demo test test-fast data venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,report]'
	touch $@

# Debian's dataset-fashion-mnist ships the four idx files; install it when missing (needs root).
data:
	@if [ ! -f $(FMNIST)/t10k-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null; \
	  else echo "Fashion-MNIST missing: sudo apt-get install dataset-fashion-mnist"; exit 1; fi; \
	fi

demo: venv data
	WNCONVERT_OFFLINE=1 $(VENV)/bin/wnconvert finetune resnet18 --data fashion-mnist --weights none --scheme layer-max \
	  --epochs 1 --limit-train 4096 --limit-val 1000 --device cpu --out $(DEMO_OUT) --overwrite
	@echo "artifacts in $(DEMO_OUT): model.onnx manifest.json report.json checkpoint.safetensors metrics.jsonl"

test: venv
	-@$(MAKE) --no-print-directory data
	$(PY) -m ruff check -q .
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
