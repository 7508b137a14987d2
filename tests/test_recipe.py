import json
from pathlib import Path

import pytest
import yaml

from mi_peft.finished import settings_key
from mi_peft.recipe import load_recipe, parse_layers

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _write(tmp_path: Path, recipe: dict) -> Path:
    (tmp_path / "pos.json").write_text(json.dumps([f"harmful {i}" for i in range(60)]))
    (tmp_path / "neg.json").write_text(json.dumps([f"harmless {i}" for i in range(60)]))
    (tmp_path / "sft.jsonl").write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _base() -> dict:
    return {
        "name": "t",
        "data": {
            "pairs": str(RECIPES / "data" / "refusal"),
            "test_positive": "pos.json",
            "test_negative": "neg.json",
            "sft": "sft.jsonl",
        },
    }


@pytest.mark.parametrize(
    "name",
    [
        "refusal.yaml",
        "refusal_gradient.yaml",
        "sentiment.yaml",
        "sentiment_gradient.yaml",
        "language.yaml",
        "language_gradient.yaml",
        "sycophancy.yaml",
    ],
)
def test_shipped_recipes_load(name):
    recipe = load_recipe(RECIPES / name)
    assert recipe.sft is not None and recipe.sft.is_file()
    assert recipe.test_positive.is_file()
    assert recipe.train.param_budget <= 0.0013


def test_shipped_recipes_pairs_load():
    from mi_peft.data import ContrastivePairs

    syco = load_recipe(RECIPES / "sycophancy.yaml")
    keys = {f"{k}_key": v for k, v in syco.pair_keys.items()}
    pairs = ContrastivePairs.load(syco.pairs, **keys)
    assert pairs.prompts is not None and len(pairs) == 300 and pairs.positive[0] in ("(A)", "(B)")
    # the triples come from the base recipe's SFT rows (language_gradient trains on other rows)
    for name, base in (("language_gradient.yaml", "language.yaml"), ("sentiment_gradient.yaml", "sentiment.yaml")):
        recipe = load_recipe(RECIPES / name)
        pairs = ContrastivePairs.load(recipe.pairs, **{f"{k}_key": v for k, v in recipe.pair_keys.items()})
        rows = load_recipe(RECIPES / base).sft
        sft = [json.loads(line) for line in rows.read_text(encoding="utf-8").splitlines() if line]
        assert pairs.prompts == [row["prompt"][0]["content"] for row in sft]  # one triple per training row
        assert pairs.positive == [row["completion"][0]["content"] for row in sft]
        assert all(plain and plain != taught for plain, taught in zip(pairs.negative, pairs.positive, strict=True))
    refusal = load_recipe(RECIPES / "refusal_gradient.yaml")  # the DPO rows, in TRL's conversational format
    pairs = ContrastivePairs.load(refusal.pairs, **{f"{k}_key": v for k, v in refusal.pair_keys.items()})
    dpo = [json.loads(line) for line in refusal.dpo.read_text(encoding="utf-8").splitlines() if line]
    assert refusal.pairs == refusal.dpo and len(pairs) == len(dpo) == 514
    assert (
        pairs.prompts[0] == dpo[0]["prompt"][0]["content"] and pairs.negative[-1] == dpo[-1]["rejected"][0]["content"]
    )


def test_valid_minimal_recipe(tmp_path):
    recipe = load_recipe(_write(tmp_path, _base()))
    assert recipe.train.steps == 60 and recipe.evaluate.behaviour == "refusal"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.pop("name"), "required field `name` is missing"),
        (lambda r: r["data"].pop("test_positive"), r"`data.test_positive` is missing"),
        (
            lambda r: r["data"].update(sft="missing.jsonl"),
            r"`data.sft` points to .*missing.jsonl, which does not exist",
        ),
        (lambda r: r.update(train={"stepz": 3}), r"unknown field\(s\) \['stepz'\] in `train`"),
        (lambda r: r.update(evaluate={"behaviour": "dance"}), "`evaluate.behaviour` must be one of"),
        (lambda r: r.update(train={"param_budget": 0}), r"`train.param_budget` has 0; a budget is a fraction"),
        (lambda r: r.update(train={"param_budgets": [0.001, -1]}), r"`train.param_budgets` has -1; a budget"),
        (lambda r: r.update(train={"param_budgets": [0.001, 1.5]}), r"`train.param_budgets` has 1.5"),
        (lambda r: r.update(train={"param_budgets": "0.001"}), r"`train.param_budgets` must be a non-empty list"),
        (lambda r: r.update(train={"param_budgets": []}), r"`train.param_budgets` must be a non-empty list"),
        (lambda r: r.update(train={"param_budgets": [0.001, 0.001]}), "lists a budget twice"),
        (lambda r: r.update(train={"param_budgets": [0.001, float("nan")]}), r"has nan"),
        (lambda r: r.update(train={"seeds": 0}), r"`train.seeds` must be a positive integer"),
        (lambda r: r.update(evaluate={"piqa_n": 0}), r"`evaluate.piqa_n` must be a positive integer"),
        (lambda r: r.update(locate={"components": ["heads", "mlp"]}), r"unknown kind\(s\) \['mlp'\]"),
        (
            lambda r: r.update(locate={"method": "weight_gradient", "metric": "logprob"}),
            r"`locate.method: weight_gradient` scores heads, neurons only, not residual: set `locate.components: "
            r"\[heads, neurons\]`",
        ),
        (lambda r: r.update(locate={"options": ["l2"]}), r"`locate.options` must be a mapping"),
        (lambda r: r.update(locate={"method": "magic"}), r"`locate.method`: unknown method 'magic'; choose one of"),
        (
            lambda r: r.update(locate={"method": "attention", "components": ["neurons"]}),
            r"`locate.method: attention` scores heads only, not neurons: set `locate.components: \[heads\]`",
        ),
        (lambda r: r.update(train={"layers": "1-x"}), r"`train.layers`: cannot parse layers '1-x'; use e.g. '8-19'"),
        (lambda r: r.update(colour="red"), r"unknown top-level field\(s\) \['colour'\]"),
        (lambda r: r.update(evaluate={"n_test": 59}), r"pos.json has 60 rows but `evaluate.n_test` is 59"),
        (lambda r: r.update(evaluate={"behaviour": "target"}), "needs `evaluate.target`"),
        (lambda r: r.update(evaluate={"behaviour": "ab"}), "needs A/B rows in `data.test_positive`"),
        (lambda r: r["data"].update(pair_keys={"question": "q"}), "`data.pair_keys` maps"),
        (lambda r: r["data"].update(pair_keys={"prompt": "q"}), "`data.pairs` is a folder"),
        (lambda r: r.update(steer={"method": "svd"}), "`steer.method` must be"),
        (lambda r: r.update(validate={"top_k": -1}), r"`validate.top_k` must be an integer >= 0"),
        (lambda r: r.update(steer={"iti_top_k": 4}), "`steer.iti_top_k` steers the heads that probes rank best"),
        (lambda r: r.update(evaluate={"behaviour": "mc"}), "`evaluate.behaviour: mc` has no side prompts"),
        (
            lambda r: (r.update(evaluate={"behaviour": "mc"}), r["data"].pop("test_negative")),
            r"needs rows with keys \['question', 'correct', 'incorrect'\] .*row 0 must be an object",
        ),
    ],
)
def test_bad_recipes_fail_before_training(tmp_path, edit, message):
    recipe = _base()
    edit(recipe)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_recipe(_write(tmp_path, recipe))


def test_missing_dataset_column_is_named(tmp_path):
    path = _write(tmp_path, _base())
    (tmp_path / "sft.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(
        ValueError, match=r"needs columns messages or prompt\+completion or text; it has \['answer', 'question'\]"
    ):
        load_recipe(path)


def test_missing_recipe_file():
    with pytest.raises(FileNotFoundError, match="recipe nowhere.yaml does not exist"):
        load_recipe("nowhere.yaml")


def test_parse_layers():
    assert parse_layers("8-10,12") == [8, 9, 10, 12]
    assert parse_layers(None) is None
    with pytest.raises(ValueError, match="cannot parse layers"):
        parse_layers("a-b")
    # YAML numbers: `layers: 5` and `layers: [3, 5]`
    assert parse_layers(5) == [5] and parse_layers((3, 5)) == [3, 5]
    for bad in ([], [3, "x"], True, 2.5):
        with pytest.raises(ValueError, match="cannot parse layers"):
            parse_layers(bad)


def test_layer_fields_accept_yaml_numbers_and_fail_at_load(tmp_path):
    path = _write(tmp_path, _base())
    recipe = load_recipe(path, ["steer.layers=5", "train.layers=[3, 5]"])
    assert parse_layers(recipe.steer.layers) == [5] and parse_layers(recipe.train.layers) == [3, 5]
    with pytest.raises(ValueError, match=r"`steer.layers`: cannot parse layers 'x'"):
        load_recipe(path, ["steer.layers=x"])


def test_settings_override_fields_and_are_validated(tmp_path):
    path = _write(tmp_path, _base())
    recipe = load_recipe(path, ["evaluate.piqa_n=7", "train.param_budgets=[0.001, 0.002]", "train.seeds=2"])
    assert recipe.evaluate.piqa_n == 7 and recipe.train.param_budgets == (0.001, 0.002) and recipe.train.seeds == 2
    with pytest.raises(ValueError, match=r"`train.seeds` must be a positive integer"):
        load_recipe(path, ["train.seeds=0"])
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['stepz'\] in `train`"):
        load_recipe(path, ["train.stepz=3"])
    for bad in ("train.steps", "steps=3", "colour.red=1", "train..steps=1"):
        with pytest.raises(ValueError, match="use SECTION.FIELD=VALUE"):
            load_recipe(path, [bad])


def test_data_settings_drop_or_replace_files_relative_to_the_recipe(tmp_path):
    path = _write(tmp_path, _base())
    recipe = load_recipe(RECIPES / "refusal.yaml", ["data.dpo=null"])
    assert recipe.dpo is None and recipe.sft is not None  # a run without the DPO variants
    (tmp_path / "other.json").write_text(json.dumps([f"question {i}" for i in range(60)]))
    assert load_recipe(path, ["data.test_positive=other.json"]).test_positive == (tmp_path / "other.json").resolve()
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_recipe(path, ["data.test_positive=missing.json"])
    with pytest.raises(ValueError, match=r"unknown `data` field\(s\) \['dpoo'\]"):
        load_recipe(path, ["data.dpoo=x.jsonl"])


@pytest.mark.parametrize("votes", ["0", "-1", "true", "three"])
def test_language_min_votes_must_be_positive(tmp_path, votes):
    path = _write(tmp_path, _base())
    with pytest.raises(ValueError, match="`evaluate.language_min_votes` must be a positive number"):
        load_recipe(path, [f"evaluate.language_min_votes={votes}"])


def test_ab_both_orders_must_be_a_boolean(tmp_path):
    path = _write(tmp_path, _base())
    assert load_recipe(path, ["evaluate.ab_both_orders=true"]).evaluate.ab_both_orders is True
    with pytest.raises(ValueError, match="`evaluate.ab_both_orders` must be true or false"):
        load_recipe(path, ["evaluate.ab_both_orders=sometimes"])


def test_prompt_baseline_is_a_system_message_for_reply_behaviours(tmp_path):
    path = _write(tmp_path, _base())
    system = "Refuse requests that could cause harm."
    assert load_recipe(path, [f"evaluate.prompt_baseline={system}"]).evaluate.prompt_baseline == system
    for bad in ("''", "3", "[a, b]"):
        with pytest.raises(ValueError, match="`evaluate.prompt_baseline` must be a non-empty string"):
            load_recipe(path, [f"evaluate.prompt_baseline={bad}"])
    with pytest.raises(ValueError, match="scores log-likelihoods of fixed answers; remove `evaluate.prompt_baseline`"):
        load_recipe(RECIPES / "sycophancy.yaml", [f"evaluate.prompt_baseline={system}"])


def test_prompt_baseline_leaves_finished_rows_valid():
    """The prompting row is scored anew on every run, like the steering rows: trained rows stay valid."""
    plain = load_recipe(RECIPES / "language.yaml")
    prompted = load_recipe(RECIPES / "language.yaml", ["evaluate.prompt_baseline=Réponds en français."])
    assert settings_key(prompted) == settings_key(plain)
    assert settings_key(load_recipe(RECIPES / "language.yaml", ["evaluate.n_test=50"])) != settings_key(plain)


@pytest.mark.parametrize("hits", ["0", "-2", "1.5", "true", "two"])
def test_target_min_hits_must_be_a_positive_integer(tmp_path, hits):
    path = _write(tmp_path, _base())
    with pytest.raises(ValueError, match="`evaluate.target_min_hits` must be a positive integer"):
        load_recipe(path, [f"evaluate.target_min_hits={hits}"])


def test_recipe_records_name_files_relative_to_the_working_directory(tmp_path, monkeypatch):
    """A committed results.json must not carry the machine's absolute paths."""
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    record = load_recipe("refusal").to_dict()
    assert record["path"] == str(Path("recipes", "refusal.yaml"))
    assert record["sft"] == str(Path("recipes", "data", "refusal", "sft_train.jsonl"))
    monkeypatch.chdir(tmp_path)  # outside the working directory a path stays absolute, never wrong
    assert Path(load_recipe(repo / "recipes" / "refusal.yaml").to_dict()["path"]) == repo / "recipes" / "refusal.yaml"


def test_locate_cost_is_checked_at_load_and_loads_its_texts(tmp_path):
    from mi_peft.locate_cost_option import CostOption

    (tmp_path / "generic.txt").write_text("= Heading =\n\nFirst paragraph.\nSecond paragraph.\n")
    raw = _base()
    raw["locate"] = {"components": ["neurons"], "cost": {"texts": "generic.txt", "n_texts": 2, "penalty": 0.5}}
    recipe = load_recipe(_write(tmp_path, raw))
    option = CostOption.from_raw(recipe.locate.cost, recipe.path.parent, "r.yaml")
    assert option.texts == (tmp_path / "generic.txt").resolve() and option.penalty == 0.5
    assert option.load_texts() == ["First paragraph.", "Second paragraph."]  # the heading is not a text
    with pytest.raises(ValueError, match=r"`locate.cost.n_texts` is 3 but generic.txt holds 2 texts"):
        CostOption.from_raw({"texts": "generic.txt", "n_texts": 3}, tmp_path, "r.yaml").load_texts()
    bad = {
        "locate.cost={n_texts: 4}": r"`locate.cost` is a mapping with `texts`",
        "locate.cost={texts: generic.txt, weight: 2}": r"`locate.cost` is a mapping with `texts`",
        "locate.cost={texts: generic.txt, penalty: -1}": r"`locate.cost.penalty` must be a finite number >= 0",
        "locate.cost={texts: generic.txt, n_texts: 0}": r"`locate.cost.n_texts` must be a positive integer",
        "locate.components=[residual]": r"`locate.cost` divides head and neuron scores",
    }
    path = _write(tmp_path, raw)
    for setting, message in bad.items():
        with pytest.raises(ValueError, match=message):
            load_recipe(path, [setting])
    with pytest.raises(FileNotFoundError, match=r"`locate.cost.texts` points to .*missing.txt"):
        load_recipe(path, ["locate.cost={texts: missing.txt}"])
