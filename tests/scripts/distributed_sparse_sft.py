"""Train a sparse adapter with mi_peft.train.sft; run directly or under `accelerate launch` (DDP or FSDP).

Usage: distributed_sparse_sft.py MODEL_DIR OUT_DIR PER_DEVICE_BATCH

Every rank writes ``OUT_DIR/rank{i}.json`` with what it really trained under (process count, backend,
accelerate's distributed type, the wrapper class and how many trainable numbers this rank holds), so a
test can tell a sharded FSDP run from a replicated DDP one instead of trusting the launch config.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

import mi_peft  # noqa: F401  (registers the adapter types in this process)
from mi_peft import SparseConfig, load_model
from mi_peft.train import sft


def fsdp_on_cpu() -> dict[str, Any]:
    """Under an FSDP launch without a GPU, put accelerate in FSDP mode; returns the ``sft`` options that keep it.

    accelerate (1.15) only turns GPU-like process groups into FSDP: on CPU an FSDP config silently runs
    gloo DDP. torch's FSDP2 itself shards on CPU/gloo, so this test-only shim sets the distributed type and
    the FSDP plugin (read from the ``FSDP_*`` variables that `accelerate launch` exported) on the shared
    state, and ``use_configured_state`` stops the Trainer from rebuilding that state. On a GPU, or once
    accelerate supports CPU FSDP, it changes nothing.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or torch.cuda.is_available():
        return {}
    state = Accelerator(cpu=True).state
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin()
    return {"accelerator_config": {"use_configured_state": True}}


def local_numel(param: torch.Tensor) -> int:
    """Numbers this rank stores for ``param``: its shard under FSDP2, all of it otherwise."""
    return (param.to_local() if isinstance(param, DTensor) else param).numel()


class RecordDistribution(TrainerCallback):
    """Write this rank's view of the model the Trainer really trains (after accelerate wrapped it)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trainable = [p for p in model.parameters() if p.requires_grad]
        record = {
            "processes": PartialState().num_processes,
            "backend": dist.get_backend() if dist.is_initialized() else "none",
            "distributed_type": AcceleratorState().distributed_type.value,
            "wrapper": type(model).__name__,
            "parameter_types": sorted({type(p).__name__ for p in trainable}),
            "trainable_numel": sum(p.numel() for p in trainable),
            "local_trainable_numel": sum(local_numel(p) for p in trainable),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{PartialState().process_index}.json").write_text(json.dumps(record))


def main(model_dir: str, out_dir: str, batch: int) -> None:
    options = fsdp_on_cpu()
    model, tokenizer = load_model(model_dir)
    rows = [{"prompt": "w10 w11 w12", "completion": " w7 w8"}] * 16  # identical rows: batch order cannot matter
    config = SparseConfig(heads={1: [0, 3]}, neurons={0: [5, 6]})
    sft(
        model,
        tokenizer,
        rows,
        config,
        output_dir=out_dir,
        max_steps=3,
        batch_size=batch,
        learning_rate=1e-2,
        bf16=False,  # float32 everywhere, so runs with different process counts agree to ~1e-7
        callbacks=[RecordDistribution(out_dir)],
        **options,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
