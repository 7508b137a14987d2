"""Two CPU processes train a sparse adapter under FSDP2 with the GPU recipe's settings and match one process.

The sparse adapter puts trainable slice parameters beside frozen base weights inside the same modules; FSDP2
shards each parameter on its own, so the mix trains without FSDP1's ``use_orig_params``. The run uses
``recipes/accelerate/fsdp.yaml`` with ``--mixed_precision no`` (bf16 autocast would make the comparison loose).
accelerate runs an FSDP config on CPU as plain gloo DDP, so the training script switches the shared state to
FSDP (see ``fsdp_on_cpu`` there); the ranks' records prove that the adapter really was sharded.
"""

import pytest
from test_cli import word_tokenizer_dir
from test_ddp import launch_two, max_adapter_difference, train_single


@pytest.mark.slow
def test_two_process_fsdp2_shards_the_sparse_adapter_and_matches_single_process(tmp_path):
    model_dir = word_tokenizer_dir(tmp_path / "model")
    records = launch_two("recipes/accelerate/fsdp.yaml", model_dir, tmp_path / "fsdp", "--mixed_precision", "no")
    assert [(r["processes"], r["backend"], r["distributed_type"]) for r in records] == [(2, "gloo", "FSDP")] * 2
    assert all(r["wrapper"].startswith("FSDP") and r["parameter_types"] == ["DTensor"] for r in records), records
    total = records[0]["trainable_numel"]
    local = [r["local_trainable_numel"] for r in records]
    assert sum(local) == total and max(local) < total, f"trainable numbers per rank {local} of {total}: not sharded"
    train_single(model_dir, tmp_path / "single")
    max_adapter_difference(tmp_path / "fsdp", tmp_path / "single")
