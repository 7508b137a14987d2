"""Seeds pooled into one row per variant; located-vs-random verdicts from the pooled intervals."""

import math

import pytest

from mi_peft.aggregate import summarize, summarize_runs, verdicts
from mi_peft.report import _LABELS, _metric_labels, _verdict_lines, comparison_table
from mi_peft.stats import combination_interval, newcombe_difference, wilson_interval


def _row(adapter, seed, target, side, budget=0.001, n=50):
    return {
        "variant": adapter,
        "adapter": adapter,
        "method": "sft",
        "budget": budget,
        "seed": seed,
        "target": target,
        "target_n": n,
        "side": side,
        "side_n": n,
        "kl_to_base": 0.1 * seed,
    }


def test_summarize_pools_seeds():
    rows = [_row("located", 0, 0.8, 0.1), _row("located", 1, 0.9, 0.2), _row("located", 2, 1.0, 0.0)]
    out = summarize(rows)
    assert out["seeds"] == 3 and "seed" not in out
    assert out["target"] == pytest.approx(0.9) and out["target_std"] == pytest.approx(0.1)
    assert out["target_n"] == 150
    assert (out["target_low"], out["target_high"]) == pytest.approx(wilson_interval(135, 150))
    assert out["kl_to_base"] == pytest.approx(0.1) and out["kl_to_base_std"] == pytest.approx(0.1)


def test_a_column_some_seeds_lack_is_left_out_not_averaged_over_the_rest():
    old = [_row("located", 0, 0.8, 0.1), _row("located", 1, 0.9, 0.2)]  # scored before "openings" existed
    new = {**_row("located", 2, 1.0, 0.0), "openings": 0.25}
    assert "openings" not in summarize([*old, new]) and "openings" not in summarize([new, *old])
    assert summarize([new, {**new, "openings": 0.75}])["openings"] == pytest.approx(0.5)
    nan_row = {**new, "openings": float("nan")}  # a measured NaN is skipped as before
    assert summarize([new, nan_row])["openings"] == pytest.approx(0.25)


def test_single_seed_has_no_spread():
    out = summarize([_row("located", 0, 0.5, 0.5)])
    assert math.isnan(out["target_std"]) and (out["target_low"], out["target_high"]) == wilson_interval(25, 50)


def test_verdicts_compare_located_random_and_matched_lora():
    runs = [_row("located", s, 0.9, 0.1) for s in range(3)]
    runs += [_row("random", s, 0.5, 0.1) for s in range(3)]
    runs += [_row("lora_matched", s, 0.8, 0.3) for s in range(3)]
    runs += [_row("located", s, 0.6, 0.1, budget=0.0001) for s in range(3)]
    runs += [_row("random", s, 0.55, 0.1, budget=0.0001) for s in range(3)]
    summary = summarize_runs(runs)
    assert [(r["adapter"], r["budget"]) for r in summary] == [
        ("located", 0.001),
        ("random", 0.001),
        ("lora_matched", 0.001),
        ("located", 0.0001),
        ("random", 0.0001),
    ]
    first, second = verdicts(summary)
    assert first["target_gain_over_random"] == pytest.approx(0.4) and first["separated_from_random"] is True
    assert first["net_gain_over_matched_lora"] == pytest.approx(0.8 - 0.5)
    assert second["budget"] == 0.0001 and second["separated_from_random"] is False and "lora_net" not in second


def test_verdicts_carry_the_difference_interval_and_preference_methods():
    base = {"variant": "base", "adapter": "base", "target": 0.02, "target_n": 150, "side": 0.0, "side_n": 150}
    runs = [_row("located", s, 0.8, 0.1) for s in range(3)] + [_row("random", s, 0.6, 0.1) for s in range(3)]
    runs += [{**_row("located", s, 0.5, 0.05), "method": "dpo", "variant": "located DPO"} for s in range(3)]
    runs += [{**_row("located", s, 0.9, 0.1), "method": "sft+dpo", "variant": "located SFT->DPO"} for s in range(3)]
    (verdict,) = verdicts([base, *summarize_runs(runs)])
    _, low, high = newcombe_difference(120, 150, 90, 150)
    assert verdict["target_gain_interval"] == pytest.approx((low, high)) and low > 0
    assert verdict["dpo_gain_over_base"] == pytest.approx(0.48)
    assert verdict["dpo_gain_interval"] == pytest.approx(newcombe_difference(75, 150, 3, 150)[1:])
    assert verdict["sft_dpo_net_gain_over_sft"] == pytest.approx(0.8 - 0.7)
    lines = _verdict_lines([verdict], seeds=3)
    assert any("sparse located DPO 50.0%" in line and "+48.0% from base" in line for line in lines)
    assert any("SFT->DPO target minus side +80.0% vs SFT alone +70.0% (+10.0% [95% CI" in line for line in lines)


def test_net_and_side_differences_carry_their_intervals():
    """Target minus side of located vs matched LoRA (and SFT->DPO vs SFT) gets the four-rate MOVER interval
    from the pooled counts; the side change vs random gets Newcombe's."""
    runs = [_row("located", s, 0.9, 0.1) for s in range(3)] + [_row("random", s, 0.6, 0.3) for s in range(3)]
    runs += [_row("lora_matched", s, 0.8, 0.2) for s in range(3)]
    runs += [{**_row("located", s, 0.84, 0.04), "method": "sft+dpo", "variant": "located SFT->DPO"} for s in range(3)]
    (verdict,) = verdicts(summarize_runs(runs))
    expected = combination_interval([(135, 150, 1), (15, 150, -1), (120, 150, -1), (30, 150, 1)])
    assert verdict["net_gain_over_matched_lora"] == pytest.approx(expected[0]) == pytest.approx(0.2)
    assert verdict["net_gain_interval"] == pytest.approx(expected[1:]) and expected[1] > 0
    assert verdict["side_change_interval"] == pytest.approx(newcombe_difference(15, 150, 45, 150)[1:])
    chain = combination_interval([(126, 150, 1), (6, 150, -1), (135, 150, -1), (15, 150, 1)])
    assert verdict["sft_dpo_net_gain_interval"] == pytest.approx(chain[1:]) and chain[1] < 0 < chain[2]
    lines = _verdict_lines([verdict], seeds=3)
    net = f"(+20.0% [95% CI {expected[1]:+.1%}, {expected[2]:+.1%}])"
    assert any(f"target minus side +80.0% vs matched LoRA +60.0% {net}" in line for line in lines)
    assert any("side effect -20.0% [95% CI" in line and "vs random" in line for line in lines)
    assert any("MOVER" in line for line in lines)


def test_net_difference_without_side_counts_is_the_target_difference():
    runs = [{**_row("located", s, 0.9, None), "side_n": 0} for s in range(3)]
    runs += [{**_row("lora_matched", s, 0.7, None), "side_n": 0} for s in range(3)]
    (verdict,) = verdicts(summarize_runs(runs))
    assert verdict["net_gain_interval"] == pytest.approx(newcombe_difference(135, 150, 105, 150)[1:])


def test_metric_labels_state_the_strict_target_judge():
    assert _metric_labels({"behaviour": "refusal"}) == _LABELS["refusal"]
    assert _metric_labels({"behaviour": "target", "target_min_hits": 1}) == _LABELS["target"]
    target, side = _metric_labels({"behaviour": "target", "target_min_hits": 2})
    assert (
        target == "target-string rate (at least 2 distinct target strings per reply)" and side == _LABELS["target"][1]
    )


def test_comparison_table_shows_shared_openings_when_rows_have_them():
    rows = [{"variant": "base", "openings": 0.125}, {"variant": "sparse located", "openings": 0.5}]
    table = comparison_table(rows)
    assert "| shared openings |" in table and "| 12% |" in table and "| 50% |" in table
    assert "shared openings" not in comparison_table([{"variant": "base", "target": 0.5}])
