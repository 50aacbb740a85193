# Two commands for users: `make verify` (the equivalence campaign, tables under reports/) and
# `make test` (the test suite, then its `multigpu` tests under torchrun). Both create .venv on
# first use.
#
# torch is installed pinned, and only when the venv cannot import it: an unpinned
# `pip install torch` would pull the multi-GB CUDA build. Override TORCH_SPEC or add
# TORCH_PIP_ARGS (e.g. an --index-url) for another build.
#
# Another torch, in a venv of its own (the pinned .venv untouched): `make verify-torch
# TORCH=2.8.0` sets up .venv-torch2.8.0 with torch==2.8.0 (its default wheel, CUDA or not, runs
# on the CPU) and runs TORCH_CAMPAIGN there, reports under reports/torch-2.8.0/; the same as
# `make verify VENV=.venv-torch2.8.0 TORCH_SPEC=torch==2.8.0 REPORTS=reports/torch-2.8.0`.
# docs/real_bugs.md lists what the older versions get wrong and the commands that show it.

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP       := $(VENV)/.setup-stamp
PYTEST_ARGS ?=
TORCHRUN_NPROCS ?= 2 4
REPORTS     ?= reports
CAMPAIGN    := --world-sizes 1,2,4,8 --examples 12 --seed 7 --resume-cases 4 --out $(REPORTS)
NIGHTLY_EXAMPLES ?= 20
NIGHTLY_SEED     ?= 1
SOAK_EXAMPLES    ?= 63
SOAK_SEED        ?= 1
TORCH            ?=
TORCH_CAMPAIGN   ?= --sharder fsdp_core,torch_fsdp2 --world-sizes 1,2,4 --examples 6 --seed 2 \
                    --resume-cases 4

.PHONY: setup test test-torchrun verify verify-torch nightly soak fsdp2-integration bench peers converge mutants clean distclean

setup: $(STAMP)

# Re-runs only when pyproject.toml changes (or the stamp is removed).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -e '.[test,hf,deepspeed]' "$(TORCH_SPEC)"   # torch named again: never upgraded
	@touch $@
	@$(PY) -c "import torch; print('torch', torch.__version__, 'in $(VENV)')"

# The suite (its `multigpu` tests on the rank pool), then the same `multigpu` tests under torchrun
# at each of TORCHRUN_NPROCS processes, the pytest processes themselves the ranks (`make test
# TORCHRUN_NPROCS=` skips those). Both run even if the first fails; either failing fails the target.
# Exit code 5 (no tests collected) is not a failure of the suite.
test: setup
	@export HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci}; \
	echo "HYPOTHESIS_PROFILE=$$HYPOTHESIS_PROFILE $(PY) -m pytest -q $(PYTEST_ARGS)"; \
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; \
	$(MAKE) --no-print-directory test-torchrun || rc=1; exit $$rc

# `pytest -m multigpu` under torchrun at each of TORCHRUN_NPROCS (README "Running under torchrun"),
# in a network namespace of its own where `unshare -rn` works: .ci/torchrun-multigpu.
test-torchrun: setup
	@if [ -n "$(strip $(TORCHRUN_NPROCS))" ]; then \
	  VENV=$(VENV) TORCHRUN_NPROCS="$(TORCHRUN_NPROCS)" .ci/torchrun-multigpu; fi

verify: setup
	$(PY) -m verify run $(CAMPAIGN)

verify-torch:
	@test -n "$(TORCH)" || { echo "usage: make verify-torch TORCH=2.8.0 [TORCH_CAMPAIGN='...']"; exit 2; }
	$(MAKE) setup VENV=.venv-torch$(TORCH) TORCH_SPEC=torch==$(TORCH)
	.venv-torch$(TORCH)/bin/python -m verify run $(TORCH_CAMPAIGN) --out $(REPORTS)/torch-$(TORCH)

# The nightly matrix, as .github/workflows/nightly.yml runs it: world size x mode x dtype, each
# cell a campaign with the nightly Hypothesis profile and CPU offload drawn (--offload both),
# reports under reports/nightly/<cell>/.
# Every cell runs; the target fails if any cell failed.
nightly: setup
	@rc=0; for w in 1 2 4 8; do for m in fast deterministic; do for d in fp32 bf16; do \
	  echo "== nightly cell W=$$w $$m $$d"; \
	  $(PY) -m verify run --world-sizes $$w --mode $$m --dtype $$d --profile nightly --offload both \
	    --examples $(NIGHTLY_EXAMPLES) --seed $(NIGHTLY_SEED) --out $(REPORTS)/nightly/W$$w-$$m-$$d || rc=1; \
	done; done; done; exit $$rc

# The leak check (issue 9): one nightly-profile campaign of SOAK_EXAMPLES x 4 world sizes x 2
# modes (63 -> 504 cases) on one rank pool, plus 8 checkpoint-resume cases; fails if a verdict
# fails or the largest rank RSS grew by more than 10% from case 50 to the end.
# reports/soak/equivalence.md has the "Pool memory" section, pool_memory.png the curve.
soak: setup
	$(PY) -m verify run --world-sizes 1,2,4,8 --examples $(SOAK_EXAMPLES) --seed $(SOAK_SEED) \
	  --profile nightly --resume-cases 8 --soak --out $(REPORTS)/soak

bench: setup
	$(PY) -m verify bench --out $(REPORTS)

# The peers (issue 7): the same drawn cases through fsdp_core, FSDP2 and DDP side by side ->
# reports/peers.md (the run's other tables under reports/peers/).
# The FSDP2 integration guide's recipe (README "Check your FSDP2 integration"): HF models through
# torch_fsdp2 with bf16, CPU offload and DCP checkpoints resumed across W = 1, 2, 4, 8.
fsdp2-integration: setup
	$(PY) -m verify run --preset fsdp2-integration --out $(REPORTS)/fsdp2-integration

peers: setup
	@$(PY) -m verify run --sharder all --world-sizes 1,2,4,8 --examples 6 --seed 7 \
	  --out $(REPORTS)/peers; rc=$$?; \
	cp $(REPORTS)/peers/peers.md $(REPORTS)/peers.md && echo "wrote $(REPORTS)/peers.md"; exit $$rc

# The planted bugs (docs/planted_bugs.md): each on its fixed scenarios, and which check caught it.
mutants: setup
	$(PY) -m verify mutants

# Sharded (W=4) vs unsharded loss curves on Python's stdlib sources -> reports/convergence.md.
converge: setup
	$(PY) -m verify converge --out $(REPORTS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
	[ ! -d $(REPORTS) ] || find $(REPORTS) -mindepth 1 ! -name .gitkeep ! -name README.md -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
