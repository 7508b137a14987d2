"""Train a sparse adapter with mi_peft.train.sft, saving a checkpoint every step, until killed.

Usage: interrupted_sft.py MODEL_DIR OUT_DIR MAX_STEPS

tests/test_checkpoints.py starts this, waits for a few checkpoint-N folders and sends SIGKILL.
The rows are identical, so batch order cannot matter and an in-process run can reproduce the steps.
"""

import sys

import mi_peft  # noqa: F401  (registers the adapter types in this process)
from mi_peft import SparseConfig, load_model
from mi_peft.train import sft

ROWS = [{"prompt": "w10 w11 w12", "completion": " w7 w8"}] * 8
CONFIG = dict(heads={1: [0, 3]}, neurons={0: [5, 6]})
ARGS = dict(batch_size=2, learning_rate=1e-2, max_length=16, disable_tqdm=True)

if __name__ == "__main__":
    model_dir, out_dir, max_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model, tokenizer = load_model(model_dir)
    sft(
        model,
        tokenizer,
        ROWS,
        SparseConfig(**CONFIG),
        output_dir=out_dir,
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=1,
        **ARGS,
    )
