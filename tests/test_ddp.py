"""Two real CPU processes (gloo DDP) train the same sparse adapter as one process over the same global batch.

The rows are identical, so the global batch is the same whatever the sharding order; the test checks that two gloo
processes really ran and that their synchronised updates equal the single-process ones. The launch helpers are
shared with ``test_fsdp.py``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import word_tokenizer_dir

SCRIPT = Path(__file__).parent / "scripts" / "distributed_sparse_sft.py"
ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def launch_two(config: str, model_dir: Path, out_dir: Path, *options: str) -> list[dict]:
    """Train with two processes under ``accelerate launch``; returns each rank's record of how it trained."""
    accelerate = Path(sys.executable).with_name("accelerate")
    launcher = [str(accelerate), "launch", "--config_file", config, "--num_processes", "2", *options]
    _run([*launcher, str(SCRIPT), str(model_dir), str(out_dir), "2"])
    return [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]


def train_single(model_dir: Path, out_dir: Path) -> None:
    """The reference: one plain process over the same global batch (2 ranks x 2 rows)."""
    _run([sys.executable, str(SCRIPT), str(model_dir), str(out_dir), "4"])


def max_adapter_difference(out_dir: Path, single_dir: Path) -> float:
    """Assert both saved adapters hold the same trained tensors (atol 1e-5); returns the largest difference."""
    distributed = load_file(out_dir / "adapter_model.safetensors")
    single = load_file(single_dir / "adapter_model.safetensors")
    assert distributed.keys() == single.keys() and len(distributed) == 2
    for key in distributed:
        assert distributed[key].abs().sum() > 0, f"{key} did not train"
        torch.testing.assert_close(distributed[key], single[key], atol=1e-5, rtol=1e-4)
    return max((distributed[k] - single[k]).abs().max().item() for k in distributed)


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    model_dir = word_tokenizer_dir(tmp_path / "model")
    records = launch_two("recipes/accelerate/ddp.yaml", model_dir, tmp_path / "ddp")
    assert [(r["processes"], r["backend"], r["distributed_type"]) for r in records] == [(2, "gloo", "MULTI_CPU")] * 2
    assert all(r["local_trainable_numel"] == r["trainable_numel"] for r in records)  # DDP replicates
    train_single(model_dir, tmp_path / "single")
    max_adapter_difference(tmp_path / "ddp", tmp_path / "single")
