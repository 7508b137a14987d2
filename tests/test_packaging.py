"""The wheel is complete: it installs, runs the CLI and carries the recipes, their data and the LICENSE.

The wheel is built from a copy of the checkout (so no build folder lands in the working tree),
installed with ``pip install --no-deps --target`` and imported from a folder outside the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "mi_peft", "recipes")
SHIPPED = [
    "language",
    "language_gradient",
    "refusal",
    "refusal_gradient",
    "sentiment",
    "sentiment_gradient",
    "sycophancy",
    "truthfulness",
]

INSPECT_INSTALLED = """
import json
import mi_peft
from mi_peft.recipe import _OPTIONAL_DATA, _REQUIRED_DATA, load_recipe, shipped_recipe_names, shipped_recipes_dir
recipes = {}
for name in shipped_recipe_names():
    recipe = load_recipe(name)
    data = {k: getattr(recipe, k) for k in (*_REQUIRED_DATA, *_OPTIONAL_DATA)}
    recipes[name] = {"path": str(recipe.path), "data": {k: str(v) for k, v in data.items() if v is not None}}
print(json.dumps({
    "module": mi_peft.__file__,
    "recipes_dir": str(shipped_recipes_dir()),
    "recipes": recipes,
    "accelerate": sorted(p.name for p in (shipped_recipes_dir() / "accelerate").glob("*.yaml")),
}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel once from a clean copy of the checkout."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(origin, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet"]
    built = subprocess.run([*command, "-w", str(root / "dist"), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, f"building the wheel failed:\n{built.stdout[-2000:]}\n{built.stderr[-4000:]}"
    (path,) = (root / "dist").glob("mi_peft-*.whl")
    return path


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    """The wheel installed into a bare folder; its dependencies come from the test environment."""
    target = tmp_path_factory.mktemp("installed") / "site"
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)]
    installed = subprocess.run(command, capture_output=True, text=True)
    assert installed.returncode == 0, f"installing {wheel.name} failed:\n{installed.stderr[-4000:]}"
    return target


def _run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """Run a command with the installed copy first on the path and a working folder outside the checkout."""
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_wheel_holds_every_package_the_license_and_the_recipes(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "mi_peft").rglob("__init__.py")}
    missing = sorted(p for p in packages if f"{p}/__init__.py" not in names)
    assert not missing, f"packages missing from the wheel; add them to [tool.setuptools].packages: {missing}"
    for name in SHIPPED:
        assert f"mi_peft/recipes/{name}.yaml" in names
    shipped_data = {n for n in names if n.startswith("mi_peft/recipes/data/")}
    repo_data = {f"mi_peft/{p.relative_to(REPO).as_posix()}" for p in (REPO / "recipes" / "data").rglob("*")}
    assert {n for n in repo_data if (REPO / n.removeprefix("mi_peft/")).is_file()} <= shipped_data
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    license_text = zipfile.ZipFile(wheel).read(f"{dist_info}/licenses/LICENSE").decode()
    assert license_text == (REPO / "LICENSE").read_text() and "Apache License" in license_text
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata


def test_installed_wheel_resolves_recipes_by_name(site, tmp_path):
    result = _run_installed(site, tmp_path, sys.executable, "-c", INSPECT_INSTALLED)
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(found["module"]).resolve().is_relative_to(site.resolve()), "imported the checkout, not the wheel"
    packaged = (site / "mi_peft" / "recipes").resolve()
    assert Path(found["recipes_dir"]).resolve() == packaged
    assert sorted(found["recipes"]) == SHIPPED
    assert found["accelerate"] == ["ddp.yaml", "deepspeed_zero2.yaml", "fsdp.yaml"]
    refusal = found["recipes"]["refusal"]
    assert Path(refusal["path"]) == packaged / "refusal.yaml"
    assert {"pairs", "test_positive", "test_negative", "sft", "dpo", "steer_pairs"} <= set(refusal["data"])
    for recipe in found["recipes"].values():
        for key, value in recipe["data"].items():
            assert Path(value).resolve().is_relative_to(packaged), f"{key} resolves outside the package: {value}"
            assert Path(value).exists(), f"{key} names {value}, which the wheel does not ship"


def test_installed_cli_runs_info_and_names_unknown_recipes(site, tmp_path):
    from conftest import make_tiny
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), eos_token="<eos>"
    )
    make_tiny("llama").save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    entry_point = site / "bin" / "mi-peft"
    assert entry_point.is_file(), "the wheel installs no `mi-peft` console script"
    info = _run_installed(site, tmp_path, sys.executable, str(entry_point), "info", "--model", str(tmp_path / "tiny"))
    assert info.returncode == 0, info.stderr[-4000:]
    assert "layers:          2" in info.stdout and "heads:           4 per layer" in info.stdout
    unknown = _run_installed(site, tmp_path, sys.executable, "-m", "mi_peft.cli", "run", "refusl")
    assert unknown.returncode == 2
    assert "no shipped recipe is named 'refusl'" in unknown.stderr
    assert str(SHIPPED) in unknown.stderr


def test_checkout_resolves_names_and_paths_to_the_same_recipe(monkeypatch, tmp_path):
    from mi_peft.recipe import load_recipe

    monkeypatch.chdir(tmp_path)  # a bare name never depends on the working folder
    by_name = load_recipe("refusal")
    assert by_name.path == (REPO / "recipes" / "refusal.yaml").resolve()
    assert (
        load_recipe(REPO / "recipes" / "refusal.yaml").sft
        == by_name.sft
        == REPO / "recipes/data/refusal/sft_train.jsonl"
    )
    with pytest.raises(FileNotFoundError, match=r"recipe refusal\.yml does not exist; .*'refusal'"):
        load_recipe("refusal.yml")
