# The two commands (README): `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.synthvlm-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test test-containers lint compile images clean-demo

# torch and torchvision first and together (same build; open_clip needs torchvision), then the
# package with every dependency pinned by constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch torchvision
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/synthvlm run synthvlm --local --preset demo --output runs/demo

test: $(STAMP)
	-bash scripts/install_kubectl.sh  # manifest render tests skip, saying why, without kubectl >= 1.27
	$(BIN)/python -m pytest -q

# The images built offline (debootstrap base, wheelhouse) and the demo pipelines run task by task in them
# through kfp.local.DockerRunner, no network, as uid 1000 and as an arbitrary uid (scripts/test_containers.sh).
test-containers: $(STAMP)
	bash scripts/test_containers.sh

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

compile: $(STAMP)
	$(BIN)/synthvlm compile --output-dir pipelines/compiled

# Every image family in synthvlm/images.py (cpu, diffusion, train, eval); DRY_RUN=1 prints the docker commands.
images:
	$(MAKE) -C images $(if $(DRY_RUN),dry-run,build push) REGISTRY=$(REGISTRY) TAG=$(TAG)

clean-demo:
	rm -rf runs/demo
