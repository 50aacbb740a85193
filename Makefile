# Two commands for users: `make verify` (the equivalence campaign, tables under reports/) and
# `make test` (the test suite). Both create .venv on first use.
#
# torch is installed pinned, and only when the venv cannot import it: an unpinned
# `pip install torch` would pull the multi-GB CUDA build. Override TORCH_SPEC or add
# TORCH_PIP_ARGS (e.g. an --index-url) for another build.

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP       := $(VENV)/.setup-stamp
PYTEST_ARGS ?=
REPORTS     ?= reports
CAMPAIGN    := --world-sizes 1,2,4,8 --examples 6 --seed 7 --out $(REPORTS)

.PHONY: setup test verify nightly mutants clean distclean

setup: $(STAMP)

# Re-runs only when pyproject.toml changes (or the stamp is removed).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -e '.[test]'
	@touch $@

# Exit code 5 (no tests collected) is not a failure of the suite.
test: setup
	@export HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci}; \
	echo "HYPOTHESIS_PROFILE=$$HYPOTHESIS_PROFILE $(PY) -m pytest -q $(PYTEST_ARGS)"; \
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

verify: setup
	$(PY) -m verify run $(CAMPAIGN)

# Placeholder for the nightly matrix: the same campaign with the nightly profile.
nightly: setup
	$(PY) -m verify run $(CAMPAIGN) --profile nightly

# The planted-bug suite (docs/planted_bugs.md): prints a line per bug and caught/total; fails
# if any bug is missed or a clean run fails.
mutants: setup
	$(PY) -m verify mutants

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
	[ ! -d $(REPORTS) ] || find $(REPORTS) -mindepth 1 ! -name .gitkeep ! -name README.md -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
