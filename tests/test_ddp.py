"""Two real CPU processes (gloo DDP) train the same sparse adapter as one process over the same global batch.

The rows are identical, so the global batch is the same whatever the sharding order; the test checks that two gloo
processes really ran and that their synchronised updates equal the single-process ones.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import word_tokenizer_dir

SCRIPT = Path(__file__).parent / "scripts" / "ddp_sparse_sft.py"
ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    model_dir = word_tokenizer_dir(tmp_path / "model")
    accelerate = Path(sys.executable).with_name("accelerate")
    _run(
        [
            str(accelerate),
            "launch",
            "--config_file",
            "recipes/accelerate/ddp.yaml",
            "--num_processes",
            "2",
            str(SCRIPT),
            str(model_dir),
            str(tmp_path / "ddp"),
            "2",
        ],
        tmp_path,
    )
    _run([sys.executable, str(SCRIPT), str(model_dir), str(tmp_path / "single"), "4"], tmp_path)
    ranks = sorted(p.read_text() for p in (tmp_path / "ddp").glob("rank*.txt"))
    assert ranks == ["2 gloo", "2 gloo"], f"expected two gloo processes, got {ranks}"
    ddp = load_file(tmp_path / "ddp" / "adapter_model.safetensors")
    single = load_file(tmp_path / "single" / "adapter_model.safetensors")
    assert ddp.keys() == single.keys() and len(ddp) == 2
    for key in ddp:
        assert ddp[key].abs().sum() > 0, f"{key} did not train"
        torch.testing.assert_close(ddp[key], single[key], atol=1e-5, rtol=1e-4)
