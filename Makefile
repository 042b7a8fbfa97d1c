# make demo: set up and record with the built-in tiny Wan model.   make test: the test suite (what CI runs).
PY ?= python3
VENV ?= .venv
# ComfyUI is found at COMFYUI_PATH, two folders up (<ComfyUI>/custom_nodes/<pack>), or ~/ComfyUI.
COMFYUI_PATH ?= $(shell for d in ../.. $(HOME)/ComfyUI; do [ -f $$d/comfy/model_patcher.py ] && cd $$d && pwd && break; done)
export COMFYUI_PATH
BIN := $(VENV)/bin

.PHONY: test demo bench setup
setup: $(VENV)/.core $(if $(COMFYUI_PATH),$(VENV)/.comfy)

$(VENV)/.core: requirements.txt requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1 -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps wan22==2.2.11  # the official Wan code, without its flash-attn requirement
	touch $@

$(VENV)/.comfy: $(VENV)/.core
	grep -vE '^(torch|torchvision|torchaudio)[[:space:]]*$$' $(COMFYUI_PATH)/requirements.txt > $(VENV)/comfyui-requirements.txt
	$(BIN)/pip install -q -r $(VENV)/comfyui-requirements.txt
	touch $@

test: setup
	$(BIN)/python -m pytest -q tests

demo: setup
	$(BIN)/python scripts/demo.py

bench: setup
	$(BIN)/python bench/cpu_recording.py
