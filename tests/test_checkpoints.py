"""An interrupted training run leaves its last complete checkpoint loadable (and resumable).

A real run (tests/scripts/interrupted_sft.py, one checkpoint per step) is killed with SIGKILL once
a few checkpoints exist; two more ``checkpoint-N`` folders are then faked the way a kill mid-save
leaves them (truncated weights, no trainer_state.json), whatever the real kill happened to hit.
"""

import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from test_cli import word_tokenizer_dir
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from mi_peft import SparseConfig, load_model
from mi_peft.checkpoints import checkpoint_problem, find_last_checkpoint, load_checkpoint
from mi_peft.train import sft

SCRIPT = Path(__file__).parent / "scripts" / "interrupted_sft.py"
ROOT = Path(__file__).resolve().parents[1]
RUN = runpy.run_path(str(SCRIPT), run_name="interrupted_sft")  # ROWS, CONFIG, ARGS; does not train
TRAINED = {"model.layers.1.self_attn.o_proj.weight": [*range(0, 8), *range(24, 32)],  # heads 0, 3 (head_dim 8)
           "model.layers.0.mlp.down_proj.weight": [5, 6]}  # fmt: skip


def _checkpoints(out: Path) -> dict[int, Path]:
    if not out.is_dir():
        return {}
    return {int(p.name.split("-")[1]): p for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit()}


def _finished(folder: Path) -> bool:
    """Independent of mi_peft: the Trainer writes trainer_state.json last, so a whole one marks a finished save."""
    try:
        return json.loads((folder / "trainer_state.json").read_text())["global_step"] == int(folder.name.split("-")[1])
    except (OSError, ValueError, KeyError):
        return False


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """Start a long run, SIGKILL it once 4 checkpoint folders exist, then fake two half-written newer ones."""
    root = tmp_path_factory.mktemp("interrupted")
    model_dir = word_tokenizer_dir(root / "model")
    out = root / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    with (root / "log.txt").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), str(model_dir), str(out), "1000000"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 300
            while len(_checkpoints(out)) < 4 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            proc.kill()  # SIGKILL: no handler, no cleanup, whatever file is being written stays as it is
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (root / "log.txt").read_text()[-3000:]
    real = _checkpoints(out)
    top = max(real)
    whole = real[max(step for step, folder in real.items() if _finished(folder))]  # real[top] may be half-written
    truncated = shutil.copytree(whole, out / f"checkpoint-{top + 1}")  # every file there, weights cut short
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    no_state = shutil.copytree(whole, out / f"checkpoint-{top + 2}")  # killed before trainer_state.json
    (no_state / "trainer_state.json").unlink()
    return SimpleNamespace(model_dir=model_dir, out=out, real=real, fakes=(truncated, no_state))


def test_kill_leaves_the_last_complete_checkpoint_loadable(interrupted):
    finished = [step for step, folder in interrupted.real.items() if _finished(folder)]
    assert len(finished) >= 3, f"expected >= 3 finished checkpoints, got steps {sorted(finished)}"
    expected = interrupted.out / f"checkpoint-{max(finished)}"
    # transformers' own helper picks the newest folder by name, i.e. a broken one
    assert get_last_checkpoint(str(interrupted.out)) == str(interrupted.fakes[1])
    assert all(checkpoint_problem(fake) for fake in interrupted.fakes)
    assert find_last_checkpoint(interrupted.out) == expected

    model = load_checkpoint(load_model(interrupted.model_dir)[0], interrupted.out)
    assert isinstance(model, PeftModel)
    on_disk = load_file(expected / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == on_disk.keys() and len(on_disk) == 2
    for key, value in on_disk.items():
        assert torch.equal(loaded[key], value), key
        assert value.abs().sum() > 0, f"{key} did not train"

    base = load_model(interrupted.model_dir)[0].state_dict()
    merged = model.merge_and_unload().state_dict()
    changed = {k for k, v in merged.items() if not torch.equal(v, base[k])}
    assert changed == set(TRAINED)
    for key, cols in TRAINED.items():
        diff = (merged[key] != base[key]).any(dim=0)
        assert diff.nonzero().flatten().tolist() == cols, key


class StepCounter(TrainerCallback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def test_resume_runs_only_the_missing_steps_and_matches_an_uninterrupted_run(interrupted, tmp_path):
    out = shutil.copytree(interrupted.out, tmp_path / "run")  # broken fakes included
    step = int(find_last_checkpoint(out).name.split("-")[1])
    counter = StepCounter()
    model, tok = load_model(interrupted.model_dir)
    config = SparseConfig(**RUN["CONFIG"])
    resumed = sft(
        model,
        tok,
        RUN["ROWS"],
        config,
        output_dir=out,
        max_steps=step + 2,
        callbacks=[counter],
        resume_from_checkpoint=True,  # the newest COMPLETE checkpoint in output_dir
        **RUN["ARGS"],
    )
    assert counter.steps == 2, f"resumed at step {step} should run 2 steps, ran {counter.steps}"
    reference = sft(
        load_model(interrupted.model_dir)[0],
        tok,
        RUN["ROWS"],
        SparseConfig(**RUN["CONFIG"]),
        output_dir=tmp_path / "reference",
        max_steps=step + 2,
        **RUN["ARGS"],
    )
    got = get_peft_model_state_dict(resumed.model)
    want = get_peft_model_state_dict(reference.model)
    assert got.keys() == want.keys()
    for key in want:  # equal weights need the restored optimizer state, not only the restored adapter
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5)


def test_no_complete_checkpoint_error_names_the_folder_and_the_fix(tmp_path):
    assert find_last_checkpoint(tmp_path) is None and find_last_checkpoint(tmp_path / "missing") is None
    with pytest.raises(FileNotFoundError, match=rf"no complete checkpoint-N folder in {tmp_path}.*save_steps=N"):
        load_checkpoint(make_tiny("llama"), tmp_path)
    partial = tmp_path / "checkpoint-3"
    partial.mkdir()
    (partial / "adapter_config.json").write_text("{}")
    assert find_last_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match=r"checkpoint-3 is incomplete .*no adapter_model\.safetensors"):
        load_checkpoint(make_tiny("llama"), partial)


@pytest.mark.parametrize("cut", [0, 5, 20, -1])
def test_truncated_or_padded_weights_are_incomplete(tmp_path, cut):
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "trainer_state.json").write_text('{"global_step": 1}')
    weights = folder / "adapter_model.safetensors"
    save_file({"a": torch.ones(4, 3), "b": torch.zeros(5)}, weights)
    assert checkpoint_problem(folder) is None
    data = weights.read_bytes()
    weights.write_bytes(data + b"\0" if cut == -1 else data[:cut])
    assert "adapter_model.safetensors" in checkpoint_problem(folder)
    assert find_last_checkpoint(tmp_path) is None
