# arcface-lightning — `make help` lists the targets.
PYTHON ?= python3
ARGS ?=
# Where torchvision finds (or downloads) the data sets: ARCFACE_DATA_DIR if set; otherwise a read-only data folder
# beside the checkout when it holds MNIST (the project's development machines); otherwise data/ (downloaded).
ARCFACE_DATA_DIR ?= $(if $(wildcard ../shared/data/MNIST/raw),$(abspath ../shared/data),data)
export ARCFACE_DATA_DIR
INSTALLED = $(PYTHON) -c "import importlib.metadata as m; m.version('arcface-lightning'); \
	import lightning, hydra, torchvision, torchmetrics, tensorboard, pytest, xdist" 2>/dev/null

.PHONY: help install train sweep compare report test lint format tensorboard clean

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: ## pip-install the package (editable) with its test tools into the active Python
	$(PYTHON) -m pip install -e ".[dev]"

train: ## train the default experiment, installing first if needed (more overrides: make train ARGS="head.s=16")
	@$(INSTALLED) || $(MAKE) install
	$(PYTHON) -m arcface_lightning.train $(ARGS)

sweep: ## the preset s × m grid (conf/sweep/s_m.yaml), report and heatmap at the end (ARGS="seed=0,1,2" ...)
	@$(INSTALLED) || $(MAKE) install
	$(PYTHON) -m arcface_lightning.train sweep=s_m $(ARGS)

compare: ## every head on the open-set protocol: a search on validation, 3 seeds, table + figure (about half an hour here)
	@$(INSTALLED) || $(MAKE) install
	$(PYTHON) -m arcface_lightning.compare $(ARGS)

report: ## (re)write a sweep's summary and heatmap: make report DIR=logs/sweep_s_m/multiruns/<time>_<pid>
	$(PYTHON) -m arcface_lightning.report $(DIR)

test: ## run the test suite in parallel processes (real-MNIST tests run when ARCFACE_DATA_DIR holds MNIST)
	@$(INSTALLED) || $(MAKE) install
	$(PYTHON) -m pytest -n auto --maxprocesses 4 --dist worksteal $(ARGS)

lint: ## ruff: lint and format check
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: ## ruff: fix what can be fixed and format
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

tensorboard: ## curves of every run under logs/ (http://localhost:6006)
	$(PYTHON) -m tensorboard.main --logdir logs

clean: ## remove run outputs and caches (not data/)
	rm -rf logs outputs multirun lightning_logs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
