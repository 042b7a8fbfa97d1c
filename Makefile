# make demo: set up and record with the built-in tiny Wan model.   make test: the test suite (what CI runs).
PY ?= python3
VENV ?= .venv
# ComfyUI is found at COMFYUI_PATH, two folders up (<ComfyUI>/custom_nodes/<pack>), or ~/ComfyUI.
COMFYUI_PATH ?= $(shell for d in ../.. $(HOME)/ComfyUI; do [ -f $$d/comfy/model_patcher.py ] && cd $$d && pwd && break; done)
export COMFYUI_PATH
# hiddenswitch's ComfyUI 0.12.1 in a Python of its own (its pins conflict with 0.3.64's; devtools/install_comfyui_newer.sh):
# its ComfyUI tests run there too, where both are found
COMFYUI_NEWER_PATH ?= $(shell d=$(HOME)/ComfyUI-0.12.1; [ -d $$d/comfy_compatibility ] && echo $$d)
COMFYUI_NEWER_PYTHON ?= $(shell p=$(HOME)/comfyui-0.12.1-venv/bin/python; [ -x $$p ] && echo $$p)
BIN := $(VENV)/bin

.PHONY: test demo bench setup
setup: $(VENV)/.core $(if $(COMFYUI_PATH),$(VENV)/.comfy)

$(VENV)/.core: requirements.txt requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1 -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps wan22==2.2.11  # the official Wan code, without its flash-attn requirement
	touch $@

# --no-warn-conflicts: wan22 is installed without its requirements on purpose (flash-attn and others it needs only
# for its own pipelines); pip would print that as a resolver error a newcomer reads as a failed install
$(VENV)/.comfy: $(VENV)/.core
	grep -vE '^(torch|torchvision|torchaudio)[[:space:]]*$$' $(COMFYUI_PATH)/requirements.txt > $(VENV)/comfyui-requirements.txt
	$(BIN)/pip install -q --no-warn-conflicts -r $(VENV)/comfyui-requirements.txt
	touch $@

test: setup
	@rm -f .cache/junit-*.xml; mkdir -p .cache
	$(BIN)/python -m pytest -q tests --junitxml=.cache/junit-main.xml; main=$$?; \
	if [ -n "$(COMFYUI_NEWER_PATH)" ] && [ -n "$(COMFYUI_NEWER_PYTHON)" ]; then \
	  echo "ComfyUI tests on $(COMFYUI_NEWER_PATH) (hiddenswitch 0.12.1)"; \
	  COMFYUI_PATH=$(COMFYUI_NEWER_PATH) WAN_CAPTURE_COMFYUI_ONLY=1 $(COMFYUI_NEWER_PYTHON) -m pytest -q tests \
	    -p no:cacheprovider --junitxml=.cache/junit-newer.xml; newer=$$?; \
	else \
	  echo "!!! ComfyUI 0.12.1 (hiddenswitch) NOT FOUND: set COMFYUI_NEWER_PATH and COMFYUI_NEWER_PYTHON (see devtools/install_comfyui_newer.sh) to run the ComfyUI tests on it too !!!"; newer=0; \
	fi; \
	$(BIN)/python devtools/test_summary.py .cache/junit-*.xml; [ $$main -eq 0 ] && [ $$newer -eq 0 ]

demo: setup
	$(BIN)/python -m scripts.demo

bench: setup
	$(BIN)/python -m bench.cpu_recording
