# The two commands of the README, from a fresh clone:
#   make demo    the stability demo (python -m stablekernels)
#   make test    the tests (the README's test command)
# Both create the environment on first use (tools/dev_env.sh: a venv in $(VENV) with a CPU
# torch and one editable build with the test extra) and reuse it afterwards; a change to the
# C++/CUDA sources or the build files rebuilds it. `make env` rebuilds it now.
# Arguments for the demo or pytest: make demo ARGS="--no-timing", make test ARGS="-k softmax".

VENV ?= .venv
ARGS ?=
STAMP := $(VENV)/.stablekernels-built
BUILD_INPUTS := setup.py pyproject.toml tools/dev_env.sh $(shell find csrc -type f 2>/dev/null)

.PHONY: demo test env

demo: $(STAMP)
	$(VENV)/bin/python -m stablekernels $(ARGS)

test: $(STAMP)
	. $(VENV)/bin/activate && eval "$$(tools/readme_block.sh 'test command') $(ARGS)"

env:
	VENV=$(VENV) tools/dev_env.sh && touch $(STAMP)

$(STAMP): $(BUILD_INPUTS)
	VENV=$(VENV) tools/dev_env.sh && touch $@
