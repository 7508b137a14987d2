"""The minimum versions declared in pyproject.toml really work.

The test installs exactly the declared floors of peft, transformers and trl into a scratch folder
(``pip install --no-deps --target``), puts it first on ``PYTHONPATH`` and runs :func:`smoke` in a
subprocess: adapters, a forward, a few SFT steps with TRL and a save/load round trip.
Run as a script, this module is that subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLOOR_PACKAGES = ("peft", "transformers", "trl")
# Installed next to the floors because the floors cannot import with the test environment's newer
# releases: transformers 5.4 wants huggingface_hub < 2 and tokenizers <= 0.23.0, and imports httpx; it
# also imports `kernels` wherever one is installed (transformers 5.25 brings 0.19, whose LayerRepository
# rejects 5.4's arguments), and declares kernels >= 0.12, < 0.13 for it.
COMPANIONS = (
    "huggingface_hub==1.33.0",
    "tokenizers==0.22.2",
    "httpx==0.28.1",
    "httpcore==1.0.9",
    "kernels==0.12.3",
)


def declared_floors(pyproject: Path = REPO / "pyproject.toml") -> dict[str, str]:
    """``{package: minimum version}`` from the ``>=`` specifiers of ``[project].dependencies``."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    from packaging.requirements import Requirement

    floors = {}
    for line in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        requirement = Requirement(line)
        minimum = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        if requirement.name in FLOOR_PACKAGES and minimum:
            floors[requirement.name] = minimum[0]
    missing = sorted(set(FLOOR_PACKAGES) - set(floors))
    if missing:
        raise ValueError(f"{pyproject}: give {missing} a `>=` minimum version in [project].dependencies.")
    return floors


def install_specs(floors: dict[str, str]) -> list[str]:
    """The floors pinned exactly, plus the companions they need to import."""
    return [f"{name}=={version}" for name, version in sorted(floors.items())] + list(COMPANIONS)


# ---------------------------------------------------------------- the subprocess side


def _tiny_llama(config_name: str = "LlamaConfig"):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = getattr(transformers, config_name)(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def _word_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tk_models
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *[f"w{i}" for i in range(126)]])}
    backend = Tokenizer(tk_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")


def _check_steering(ids) -> None:
    """Qwen2 reads ``attention_type`` from each decoder layer in transformers < 5.4, which a steered layer lacks."""
    import torch
    from peft import get_peft_model

    from mi_peft import SteeringConfig

    for config_name in ("LlamaConfig", "Qwen2Config"):
        config = SteeringConfig.from_directions(torch.randn(64), layers=[1], alpha=4.0)
        steered = get_peft_model(_tiny_llama(config_name), config)
        with torch.no_grad():
            out = steered(ids).logits
            with steered.disable_adapter():
                plain = steered(ids).logits
        assert torch.isfinite(out).all() and not torch.allclose(out, plain), f"steering {config_name} changed nothing"


def _check_sft_round_trip(ids, tmp: Path) -> None:
    import torch
    from peft import PeftModel

    from mi_peft import SparseConfig
    from mi_peft.train import sft

    rows = [{"prompt": f"w{i} w{i + 1}", "completion": " w7 w8"} for i in range(10, 18)]
    config = SparseConfig(heads={1: [0, 3]}, neurons={0: [5, 6]})
    run = sft(_tiny_llama(), _word_tokenizer(), rows, config, output_dir=tmp / "sft", max_steps=3, batch_size=4)
    assert run.losses and all(torch.isfinite(torch.tensor(run.losses))), run.log_history
    trained = run.model.eval()
    with torch.no_grad():
        before = trained(ids).logits
        with trained.disable_adapter():
            assert not torch.allclose(before, trained(ids).logits), "SFT left the sparse adapter at identity"
    trained.save_pretrained(tmp / "adapter")
    loaded = PeftModel.from_pretrained(_tiny_llama(), tmp / "adapter").eval()
    with torch.no_grad():
        after = loaded(ids).logits
    assert torch.allclose(before, after, atol=1e-6), f"reloaded logits differ by {(before - after).abs().max()}"


def _check_dpo(tmp: Path) -> None:
    """``mi_peft.train.dpo`` imports TRL's DPOTrainer, which trl < 0.29 cannot import on transformers 5."""
    import torch

    from mi_peft import SparseConfig
    from mi_peft.train import dpo

    rows = [{"prompt": f"w{i} w{i + 1}", "chosen": " w7", "rejected": " w9"} for i in range(10, 18)]
    config = SparseConfig(heads={1: [0, 3]}, neurons={0: [5, 6]})
    run = dpo(_tiny_llama(), _word_tokenizer(), rows, config, output_dir=tmp / "dpo", max_steps=2, batch_size=4)
    assert run.losses and all(torch.isfinite(torch.tensor(run.losses))), run.log_history


def _check_load_model_dtype(tmp: Path) -> None:
    """``load_model`` passes ``dtype=`` to ``from_pretrained``."""
    import torch

    from mi_peft import load_model

    _tiny_llama().save_pretrained(tmp / "tiny")
    _word_tokenizer().save_pretrained(tmp / "tiny")
    model, _ = load_model(tmp / "tiny", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16, "load_model ignored dtype="


def smoke(expected: dict[str, str], site: Path) -> None:
    """Assert the floors are the versions imported, then exercise the code that needs them."""
    import importlib
    import tempfile

    import torch
    from packaging.version import Version

    for name, version in expected.items():
        module = importlib.import_module(name)
        assert Version(module.__version__) == Version(version), f"{name} {module.__version__} != floor {version}"
        assert Path(module.__file__).resolve().is_relative_to(site.resolve()), f"{name} imported from {module.__file__}"
    ids = torch.randint(2, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    _check_steering(ids)
    with tempfile.TemporaryDirectory() as tmp:
        _check_sft_round_trip(ids, Path(tmp))
        _check_dpo(Path(tmp))
        _check_load_model_dtype(Path(tmp))
    print("floors ok:", json.dumps(expected))


# ---------------------------------------------------------------- the test


def _pip_install(specs: list[str], site: Path, cache: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--disable-pip-version-check"]
    command += ["--target", str(site), "--cache-dir", str(cache), *specs]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_declared_floors_are_read_from_pyproject():
    floors = declared_floors()
    assert set(floors) == set(FLOOR_PACKAGES)
    specs = install_specs(floors)
    assert [s for s in specs if s.split("==")[0] in FLOOR_PACKAGES] == [f"{n}=={floors[n]}" for n in sorted(floors)]


def test_floors_error_names_the_missing_minimum(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["peft>=0.20", "transformers", "trl>=0.20"]\n')
    with pytest.raises(ValueError, match=r"give \['transformers'\] a `>=` minimum version"):
        declared_floors(pyproject)


@pytest.mark.slow
def test_code_runs_on_the_declared_minimum_versions(tmp_path):
    floors = declared_floors()
    site = tmp_path / "site"
    installed = _pip_install(install_specs(floors), site, tmp_path / "pip-cache")
    if installed.returncode != 0:
        message = f"pip could not install the declared floors {floors}:\n{installed.stderr[-3000:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)  # offline outside CI; CI always installs
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(Path(__file__).resolve()), json.dumps(floors), str(site)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, (
        f"the smoke run on the floors failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    )
    assert f"floors ok: {json.dumps(floors)}" in result.stdout


if __name__ == "__main__":
    smoke(json.loads(sys.argv[1]), Path(sys.argv[2]))
