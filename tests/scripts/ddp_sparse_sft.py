"""Train a sparse adapter with mi_peft.train.sft; run directly or under `accelerate launch`.

Usage: ddp_sparse_sft.py MODEL_DIR OUT_DIR PER_DEVICE_BATCH
"""

import sys
from pathlib import Path

import torch.distributed as dist
from accelerate import PartialState

import mi_peft  # noqa: F401  (registers the adapter types in this process)
from mi_peft import SparseConfig, load_model
from mi_peft.train import sft

model_dir, out_dir, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
model, tokenizer = load_model(model_dir)
rows = [{"prompt": "w10 w11 w12", "completion": " w7 w8"}] * 16  # identical rows: batch order cannot matter
config = SparseConfig(heads={1: [0, 3]}, neurons={0: [5, 6]})
sft(model, tokenizer, rows, config, output_dir=out_dir, max_steps=3, batch_size=batch, learning_rate=1e-2)
state = PartialState()
backend = dist.get_backend() if dist.is_initialized() else "none"
Path(out_dir, f"rank{state.process_index}.txt").write_text(f"{state.num_processes} {backend}")
