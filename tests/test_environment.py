"""The run environment record: exact base-weight hash, package versions, training precision."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import torch
from conftest import make_tiny
from peft import LoraConfig, get_peft_model

from mi_peft.environment import package_versions, run_environment, weights_sha256
from mi_peft.fingerprint import model_fingerprint
from mi_peft.precision import resolve_precision


def test_weights_hash_is_exact_and_ignores_adapters():
    model = make_tiny("llama")
    digest = weights_sha256(model)
    assert weights_sha256(copy.deepcopy(model)) == digest
    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False))
    assert weights_sha256(wrapped) == digest  # adapter weights are not base weights
    nudged = copy.deepcopy(model)
    with torch.no_grad():
        weight = nudged.model.layers[0].mlp.down_proj.weight
        weight[3, 5] = torch.nextafter(weight[3, 5], torch.tensor(float("inf")))  # one value, one ulp
    assert weights_sha256(nudged) != digest
    # the fingerprint is built to survive such changes (and dtype casts); the hash is not
    assert model_fingerprint(nudged) == model_fingerprint(model)
    assert weights_sha256(copy.deepcopy(model).to(torch.bfloat16)) != digest


def test_package_versions_and_run_environment():
    versions = package_versions(("torch", "peft", "no-such-distribution-x"))
    assert versions["torch"] == torch.__version__ and versions["no-such-distribution-x"] is None
    model = make_tiny("qwen2")
    env = run_environment(model, "float32")
    assert env["train_precision"] == "float32" and run_environment(model)["train_precision"] == resolve_precision()
    assert env["weights_sha256"] == weights_sha256(model) and env["model_fingerprint"] == model_fingerprint(model)
    assert env["torch_threads"] == torch.get_num_threads() and set(env["packages"]) >= {"transformers", "trl"}


def test_source_commit_names_this_checkout():
    repo = Path(__file__).resolve().parents[1]
    env = run_environment(make_tiny("llama"))
    if (repo / ".git").exists():  # a checkout (CI clones one): the commit git reports, "+dirty" with changes
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert env["source_commit"].removesuffix("+dirty") == head.strip() and len(head.strip()) == 40
    else:  # an unpacked sdist: no commit to name
        assert env["source_commit"] is None
