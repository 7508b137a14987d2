"""Recipes: one YAML file that describes a whole Locate -> Steer -> Improve run.

A recipe is validated completely (fields, types, files, dataset columns) before any model is
loaded, so a typo fails in a second instead of after an hour of training.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .recipe_checks import BEHAVIOURS, check_budgets, check_recipe, check_sizes, is_finite_number, parse_layers


@dataclass
class LocateSection:
    method: str = "attribution_patching"
    metric: str | None = "refusal"
    metric_args: dict[str, Any] | None = None
    pairs: int = 64
    batch_size: int = 8
    components: tuple[str, ...] = ("heads", "neurons", "residual")
    positions: str | None = None  # None: the method's default ("all" for weight_gradient, else "last")
    options: dict[str, Any] | None = None  # method options passed to locate(), e.g. {norm: l2} or {min_prob: 0.05}
    cost: dict[str, Any] | None = None  # gain per unit of cost on generic text (mi_peft.locate_cost_option)


@dataclass
class ValidateSection:
    """Ablate the top-k located components vs k random ones; ``metric`` defaults to the locate metric.

    ``top_k: 0`` skips the check (the report says so), e.g. for a ``probe`` localization without a
    metric. ``contrast`` measures ``metric(positive) - metric(negative)`` per pair instead of the positive
    side alone: with ``metric: logprob`` on completion pairs, the log-likelihood margin that multiple
    choice scores.
    """

    top_k: int = 10
    pairs: int = 16
    metric: str | None = None
    metric_args: dict[str, Any] | None = None
    contrast: bool = False


@dataclass
class SteerSection:
    """Alpha sweep on ``val_prompts`` held-out prompts taken after the first ``n_test`` of the test files."""

    layers: str | int | tuple[int, ...] = "8-19"
    alphas: tuple[float, ...] = (0.0, 2.0, 4.0, 8.0)
    method: str = "mean_diff"
    conditional: bool = False
    val_prompts: int = 16
    iti_top_k: int | None = None  # ITI head steering of the top-k located heads (needs `locate.method: probe`)
    iti_alphas: tuple[float, ...] = (5.0, 10.0, 15.0)  # in units of each head's activation std, as ITI
    sae: dict[str, Any] | None = None  # SAE-latent steering row, e.g. {layer: 15, d_sae: 2048, top_k: 5} (mi_peft.sae)


@dataclass
class TrainSection:
    steps: int = 60
    lr: float = 1e-3
    lora_lr: float = 2e-4
    batch_size: int = 8
    max_length: int = 192
    param_budget: float = 0.0013
    kinds: tuple[str, ...] = ("heads", "neurons")
    head_mode: str = "out"
    neuron_mode: str = "out"
    layers: str | int | tuple[int, ...] | None = (
        None  # e.g. "1-28": located, random and matched LoRA train these layers only
    )
    lora_r: int = 8
    dpo_steps: int | None = None
    dpo_lr: float | None = None  # None: the sparse `lr`
    dpo_beta: float = 0.1
    dpo_args: dict[str, Any] | None = None  # any other trl.DPOConfig field, e.g. loss_type, loss_weights, ld_alpha
    dpo_from_sft: bool = False  # also run SFT -> DPO on the same located slices
    matched_lora: bool = True  # a LoRA with the sparse adapter's trainable count (within 10%)
    lora_baseline: bool = True  # LoRA r=`lora_r` on all linear layers
    seeds: int = 1  # training order and random-component draw change per seed; the located selection does not
    param_budgets: tuple[float, ...] | None = None  # budget sweep: located, random, matched LoRA at each
    precision: str = "auto"  # bfloat16 autocast where the CPU/GPU has bf16 units, else float32 (mi_peft.precision)
    matched_lora_lr: float | None = None  # None: `lora_lr`; a tiny matched LoRA may need the sparse step size
    conditional: bool = False  # also score located and random gated by the steering condition (`steer.conditional`)


@dataclass
class EvaluateSection:
    behaviour: str = "refusal"
    n_test: int = 50
    max_new_tokens: int = 32
    n_neutral: int = 20
    target: str | tuple[str, ...] | None = None
    target_min_hits: int = 1  # distinct target strings a reply needs; 2 fails a one-word stock phrase
    ab_both_orders: bool = False  # ask A/B items in both option orders, so a letter preference cancels out
    language: str | None = None
    language_min_votes: float = 3.0  # function-word votes; 3 fails the template "La réponse est 1." (1.5 votes)
    general: bool = True  # PIQA, BLiMP and held-out text perplexity for every variant
    piqa_n: int = 100
    blimp_n: int = 5  # pairs per BLiMP phenomenon (67 phenomena)
    ppl_texts: int = 24  # WikiText-2 test paragraphs
    health_prompts: int = 32  # generic held-out instructions for degenerate/duplicate/distinct-2
    health_tokens: int = 48
    dpo_held_out: int = 32  # DPO rows kept out of training to measure the chosen-minus-rejected margin
    precision: str = "float32"  # bfloat16 changes some greedy replies: scores would differ between CPU classes
    # a system message for a zero-training prompting row: the base model asked under it, same held-out prompts
    prompt_baseline: str | None = None


@dataclass
class Recipe:
    """A parsed, validated recipe. Paths are resolved relative to the recipe file."""

    name: str
    path: Path
    pairs: Path
    test_positive: Path
    test_negative: Path | None = None
    pair_keys: dict[str, str] | None = None
    targets: Path | None = None
    steer_pairs: Path | None = None
    sft: Path | None = None
    dpo: Path | None = None
    neutral: Path | None = None
    model: str | None = None
    description: str = ""
    seed: int = 0
    locate: LocateSection = field(default_factory=LocateSection)
    validate: ValidateSection = field(default_factory=ValidateSection)
    steer: SteerSection = field(default_factory=SteerSection)
    train: TrainSection = field(default_factory=TrainSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; files under the working directory are relative, so a report names no machine path."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "__dataclass_fields__"):
                value = {g.name: getattr(value, g.name) for g in fields(value)}
            out[f.name] = _portable(value) if isinstance(value, Path) else value
        return json.loads(json.dumps(out, default=str))


_SECTIONS = {
    "locate": LocateSection,
    "validate": ValidateSection,
    "steer": SteerSection,
    "train": TrainSection,
    "evaluate": EvaluateSection,
}
_REQUIRED_DATA = ("pairs", "test_positive")
_OPTIONAL_DATA = ("test_negative", "sft", "dpo", "neutral", "targets", "steer_pairs")
_PAIR_KEYS = ("prompt", "positive", "negative")
_TOP_LEVEL = {"name", "description", "model", "seed", "data", *_SECTIONS}


def _section(cls: type, raw: Any, where: str, source: Path) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: `{where}` must be a mapping, got {type(raw).__name__}.")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown} in `{where}`; allowed: {sorted(known)}.")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return cls(**values)


def _data_path(base: Path, data: dict[str, Any], key: str, source: Path, required: bool) -> Path | None:
    value = data.get(key)
    if value is None:
        if required:
            raise ValueError(f"{source}: `data.{key}` is missing; it names a file or folder relative to the recipe.")
        return None
    path = (base / str(value)).resolve()
    if not path.exists():
        raise FileNotFoundError(f"{source}: `data.{key}` points to {path}, which does not exist.")
    return path


def shipped_recipes_dir() -> Path:
    """Folder of the recipes that ship with mi-peft: ``mi_peft/recipes`` when installed from a wheel,
    the repository's ``recipes/`` in a checkout or an editable install (the same files)."""
    from importlib.resources import files

    packaged = files("mi_peft") / "recipes"
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[1] / "recipes"


def shipped_recipe_names() -> list[str]:
    """Names accepted by ``load_recipe(name)`` and ``mi-peft run name``."""
    folder = shipped_recipes_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def resolve_recipe_path(path: str | Path) -> Path:
    """An existing file as given, else a bare name such as ``"refusal"`` looked up among the shipped recipes."""
    source = Path(path)
    if source.is_file():
        return source
    names, name = shipped_recipe_names(), str(path)
    if source.name == name and not source.suffix:
        if name in names:
            return shipped_recipes_dir() / f"{name}.yaml"
        raise FileNotFoundError(f"no shipped recipe is named {name!r}; use one of {names} or a path to a YAML file.")
    raise FileNotFoundError(f"recipe {source} does not exist; give a YAML path or a shipped recipe name {names}.")


def _apply_setting(raw: dict[str, Any], setting: str, source: Path) -> None:
    """``"evaluate.piqa_n=32"``: set one field of the raw recipe (the value is read as YAML).

    ``data.KEY`` works too: ``data.dpo=null`` drops the DPO variants; a path is relative to the recipe file.
    """
    key, sep, value = setting.partition("=")
    parts = key.strip().split(".")
    settable = sorted((*_SECTIONS, "data"))
    if not sep or len(parts) != 2 or parts[0] not in settable or not all(parts):
        raise ValueError(
            f"{source}: cannot apply setting {setting!r}; use SECTION.FIELD=VALUE with SECTION one of "
            f"{settable}, e.g. evaluate.piqa_n=32."
        )
    section = raw.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ValueError(f"{source}: `{parts[0]}` must be a mapping, got {type(section).__name__}.")
    section[parts[1]] = yaml.safe_load(value)


def load_recipe(path: str | Path, settings: Sequence[str] = ()) -> Recipe:
    """Parse and validate a recipe: a YAML path or a shipped name such as ``"refusal"``.

    Data paths are relative to the recipe file, and every referenced file must exist. ``settings``
    override single fields (``"train.steps=20"``) before validation, so they are checked like the file.
    """
    source = resolve_recipe_path(path)
    raw = yaml.safe_load(source.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: a recipe is a YAML mapping with at least `name` and `data`.")
    for setting in settings:
        _apply_setting(raw, setting, source)
    unknown = sorted(set(raw) - _TOP_LEVEL)
    if unknown:
        raise ValueError(f"{source}: unknown top-level field(s) {unknown}; allowed: {sorted(_TOP_LEVEL)}.")
    for key in ("name", "data"):
        if key not in raw:
            raise ValueError(f"{source}: required field `{key}` is missing.")
    data = raw["data"]
    if not isinstance(data, dict):
        raise ValueError(f"{source}: `data` must be a mapping of names to files.")
    extra = sorted(set(data) - set(_REQUIRED_DATA) - set(_OPTIONAL_DATA) - {"pair_keys"})
    if extra:
        allowed = sorted((*_REQUIRED_DATA, *_OPTIONAL_DATA, "pair_keys"))
        raise ValueError(f"{source}: unknown `data` field(s) {extra}; allowed: {allowed}.")
    pair_keys = data.get("pair_keys")
    if pair_keys is not None and (not isinstance(pair_keys, dict) or set(pair_keys) - set(_PAIR_KEYS)):
        raise ValueError(
            f"{source}: `data.pair_keys` maps {list(_PAIR_KEYS)} to column names of `data.pairs`, got {pair_keys!r}."
        )
    base = source.parent
    paths = {k: _data_path(base, data, k, source, k in _REQUIRED_DATA) for k in _REQUIRED_DATA + _OPTIONAL_DATA}
    sections = {name: _section(cls, raw.get(name), name, source) for name, cls in _SECTIONS.items()}
    recipe = Recipe(
        name=str(raw["name"]),
        path=source.resolve(),
        model=raw.get("model"),
        description=str(raw.get("description", "")),
        seed=int(raw.get("seed", 0)),
        pair_keys=pair_keys,
        **paths,
        **sections,
    )
    check_recipe(recipe, source)
    return recipe


def _portable(path: Path) -> str:
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


__all__ = [
    "BEHAVIOURS",
    "Recipe",
    "check_budgets",
    "check_sizes",
    "is_finite_number",
    "load_recipe",
    "parse_layers",
]
