"""benchmarks/adapters.py in --quick mode on a tiny random llama: every row it prints is finite and positive.

The benchmark's numbers are only worth reading if every variant it names was really built, timed and
measured; this runs the whole script (in-process, so the forked peak-RSS children are cheap) and checks
the returned numbers and the printed tables, not any speed.
"""

import math
from pathlib import Path

import pytest
from conftest import load_script
from test_cli import word_tokenizer_dir

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "adapters.py"


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """(returned numbers, printed markdown) of one --quick run on a tiny llama with a word-level tokenizer."""
    import contextlib
    import io

    bench = load_script(SCRIPT)
    folder = word_tokenizer_dir(tmp_path_factory.mktemp("tiny_bench"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        numbers = bench.run(["--quick", "--model", str(folder)])
    return bench, numbers, out.getvalue()


def test_every_variant_has_finite_positive_times_and_ratios(report):
    bench, numbers, _ = report
    names = {v.name for v in (*bench.TABLE, *bench.UPPER, *bench.BF16)}
    assert set(numbers["median_step"]) == names
    assert all(positive(t) for t in numbers["median_step"].values())
    assert all(positive(ratio) for _, ratio in numbers["located"])
    assert all(math.isfinite(value) and value >= 0 for _, value, _, _ in numbers["targets"])
    loss = numbers["loss"]
    assert all(positive(loss[key]) for key in ("before", "fp32", "bf16", "speedup"))


def test_selections_and_backward_floor(report):
    bench, numbers, _ = report
    info = numbers["info"]
    assert info[bench.FROZEN.name]["trainable"] == 0 and info[bench.FULL.name]["share"] == pytest.approx(1.0)
    for v in (bench.NEURONS, bench.QKVO, bench.BIAS, bench.LORA, *bench.UPPER):
        assert positive(info[v.name]["trainable"]) and info[v.name]["share"] < 1
    for spread, upper in zip((bench.NEURONS, bench.QKVO), bench.UPPER, strict=True):
        assert info[spread.name]["floor"] == 0  # the spread selection reaches layer 0
        assert info[upper.name]["floor"] >= 1  # the backward stops above it


def test_peak_rss_and_generation(report):
    bench, numbers, _ = report
    assert set(numbers["rss"]) == {v.name for v in (*bench.TABLE, *bench.UPPER)}
    assert all(positive(r["steps"]) and positive(r["load"]) for r in numbers["rss"].values())
    generation = numbers["generation"]
    assert {"base model", "mi-peft steering `add`", "mi-peft conditional steering"} <= set(generation)
    assert all(positive(ratio) for ratio in generation.values())
    # every steering implementation adds the same vectors at the same layers
    agreement = numbers["agreement"]
    steered = [name for name in agreement if not name.startswith("base model")]
    assert agreement["base model"] > 1e-3 and len(steered) >= 2
    assert all(agreement[name] < 1e-4 for name in steered)


def test_printed_tables_have_a_row_per_variant(report):
    bench, _, text = report
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    for v in (*bench.TABLE, *bench.UPPER):
        row = next(line for line in rows if line.startswith(f"| {v.name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(positive(float(cells[i])) for i in (5, 6, 9)), row  # vs frozen, vs LoRA, RSS vs frozen
    assert "| target | measured | target | met |" in text
