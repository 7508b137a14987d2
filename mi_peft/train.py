"""Train located adapters with TRL: a sparse adapter is just a ``peft_config``.

There is no training loop here. :func:`sft` and :func:`dpo` check the data before anything
expensive starts, build TRL's ``SFTConfig``/``DPOConfig`` with CPU-friendly defaults, run
``SFTTrainer``/``DPOTrainer`` (the DPO reference is the same model with its adapter disabled),
and save the adapter plus the localization it came from.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, load_dataset
from peft import PeftConfig, PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback, TrainingArguments

from .checkpoints import resolve_checkpoint
from .precision import resolve_precision

SFT_FORMATS: tuple[tuple[str, ...], ...] = (("messages",), ("prompt", "completion"), ("text",))
DPO_FORMAT: tuple[str, ...] = ("prompt", "chosen", "rejected")


@dataclass
class TrainResult:
    """What a training run produced."""

    model: PeftModel
    output_dir: Path
    train_seconds: float
    trainable_parameters: int
    total_parameters: int
    log_history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        return [row["loss"] for row in self.log_history if "loss" in row]


def load_data(data: Dataset | str | os.PathLike | Sequence[Mapping[str, Any]]) -> Dataset:
    """A ``datasets.Dataset`` from a Dataset, a list of dicts, or a JSON/JSONL/CSV file."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"training data file {path} does not exist.")
        kind = {".json": "json", ".jsonl": "json", ".csv": "csv"}.get(path.suffix)
        if kind is None:
            raise ValueError(f"unsupported training data format {path.suffix!r}; use .json, .jsonl or .csv.")
        return load_dataset(kind, data_files=str(path), split="train")
    rows = list(data)
    if not rows:
        raise ValueError("training data is empty.")
    return Dataset.from_list(rows)


def check_columns(dataset: Dataset, formats: Sequence[Sequence[str]], trainer: str) -> None:
    """Fail before training when no accepted column set is present."""
    if len(dataset) == 0:
        raise ValueError(f"{trainer} training data is empty.")
    have = set(dataset.column_names)
    if not any(set(cols) <= have for cols in formats):
        wanted = " or ".join("+".join(cols) for cols in formats)
        raise ValueError(f"{trainer} data needs columns {wanted}; the dataset has {sorted(have)}.")


# transformers 5.25 renamed TrainingArguments.gradient_checkpointing (the old name warns); the floor (5.4) has only it
_CHECKPOINTING = (
    "activation_checkpointing"
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}
    else "gradient_checkpointing"
)


def _common_args(max_steps: int, learning_rate: float, batch_size: int, seed: int, precision: str) -> dict[str, Any]:
    on_gpu = torch.cuda.is_available()
    bf16 = resolve_precision(precision) == "bfloat16"
    return dict(
        max_steps=max_steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=max(1, min(10, max_steps // 10)),
        report_to=[],
        seed=seed,
        use_cpu=not on_gpu,
        # bf16 autocast (weights and optimizer stay float32) where the GPU or CPU has bf16 matrix units;
        # TRL's own default turns it on everywhere, and CPUs without such units run it ~15x slower
        bf16=bf16,
        disable_tqdm=False,
    )


def _checkpointing(user_args: Mapping[str, Any]) -> dict[str, Any]:
    """Recomputation off (TRL turns it on by default) unless the caller set it under either name.

    Small models train faster without it; pass ``activation_checkpointing=True`` (or, before transformers
    5.25, ``gradient_checkpointing=True``) for large ones. Setting the new name here while the caller set
    the old one would make transformers ignore the caller's value.
    """
    if {"activation_checkpointing", "gradient_checkpointing"} & set(user_args):
        return {}
    return {_CHECKPOINTING: False}


def _check_peft(model: PreTrainedModel | PeftModel, peft_config: PeftConfig | None) -> None:
    if isinstance(model, PeftModel) and peft_config is not None:
        raise ValueError("`model` is already a PeftModel; pass either a PeftModel or `peft_config`, not both.")
    if not isinstance(model, PeftModel) and peft_config is None:
        raise ValueError("pass `peft_config=` (e.g. a SparseConfig) or a PeftModel: mi-peft trains adapters only.")
    if peft_config is not None and not isinstance(peft_config, PeftConfig):
        raise TypeError(f"`peft_config` must be a peft.PeftConfig, got {type(peft_config).__name__}.")


def _run(
    trainer_cls: type,
    config_cls: type,
    formats: Sequence[Sequence[str]],
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Any,
    peft_config: PeftConfig | None,
    output_dir: str | os.PathLike,
    common: dict[str, Any],
    localization: Any | None,
    callbacks: Sequence[TrainerCallback] | None,
    **trainer_kwargs: Any,
) -> TrainResult:
    """Check everything, train with a TRL trainer, save the adapter (and its localization)."""
    _check_peft(model, peft_config)
    dataset = load_data(train_dataset)
    check_columns(dataset, formats, trainer_cls.__name__)
    output_dir = Path(output_dir)
    common = {"save_strategy": "steps" if "save_steps" in common else "no", **common}
    trainer = trainer_cls(
        model=model,
        args=config_cls(output_dir=str(output_dir), **common),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=list(callbacks or []),
        **trainer_kwargs,
    )
    copy_reference_adapter(trainer.model)
    if trainer.train_dataset is not None and len(trainer.train_dataset) == 0:
        raise ValueError(
            f"no training row is left after {trainer_cls.__name__}'s preprocessing: with max_length="
            f"{common.get('max_length')} every row's completion was truncated away. Raise `max_length`."
        )
    started = time.perf_counter()
    resume = trainer.args.resume_from_checkpoint  # TrainingArguments keeps it, but Trainer.train() ignores it
    if resume:  # True: the newest COMPLETE checkpoint (transformers' own pick may be half-written)
        resume = str(resolve_checkpoint(output_dir if resume is True else resume))
    trainer.train(resume_from_checkpoint=resume or None)
    seconds = time.perf_counter() - started
    _full_state_dict_for_saving(trainer)
    trainer.save_model(str(output_dir))
    if localization is not None and trainer.accelerator.is_main_process:
        localization.save(output_dir / "localization")
    # keep_fp32_wrapper=False: under bf16 the prepared forward stays wrapped in autocast otherwise
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    trainable, total = model.get_nb_trainable_parameters()
    return TrainResult(model, output_dir, seconds, trainable, total, list(trainer.state.log_history))


def _full_state_dict_for_saving(trainer: Any) -> None:
    """Gather a full state dict for the final save: with FSDP's SHARDED_STATE_DICT, ``save_model``
    writes no adapter file at all (accelerate's own advice: train sharded, save full)."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if trainer.is_fsdp_enabled and plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type):
        plugin.set_state_dict_type("FULL_STATE_DICT")


def copy_reference_adapter(model: Any) -> int:
    """Make TRL's frozen ``"ref"`` adapter an exact copy of ``"default"``; returns the tensors copied.

    Given a model that already carries a trained adapter (SFT -> DPO), ``DPOTrainer`` adds an adapter
    named ``"ref"`` and copies the parameters whose names contain ``".default."``. Sparse adapter
    parameters are named ``...sparse_delta.default`` (a ``ParameterDict`` entry), which that pattern
    misses, so the reference would silently be the base model instead of the SFT adapter.
    """
    if not isinstance(model, PeftModel) or "ref" not in model.peft_config:
        return 0
    params = dict(model.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, param in params.items():
            ref_name = name[: -len(".default")] + ".ref" if name.endswith(".default") else name
            ref = params.get(ref_name.replace(".default.", ".ref."))
            if ref is not None and ref is not param:
                ref.copy_(param)
                ref.requires_grad_(False)
                copied += 1
    return copied


def sft(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Dataset | str | os.PathLike | Sequence[Mapping[str, Any]],
    peft_config: PeftConfig | None = None,
    *,
    output_dir: str | os.PathLike = "runs/sft",
    max_steps: int = 100,
    learning_rate: float = 1e-3,
    batch_size: int = 8,
    max_length: int | None = 256,
    seed: int = 0,
    precision: str = "auto",
    localization: Any | None = None,
    callbacks: Sequence[TrainerCallback] | None = None,
    **sft_args: Any,
) -> TrainResult:
    """Supervised fine-tuning of an adapter with TRL's ``SFTTrainer``.

    Args:
        train_dataset: conversational ``messages``, ``prompt``/``completion`` (strings or message
            lists) or ``text`` rows; chat templates are applied by TRL. Loss is on completions
            only for prompt/completion data (TRL's default).
        peft_config: e.g. ``SparseConfig.from_localization(result, param_budget=0.001)``.
        precision: ``"auto"`` (bfloat16 autocast where the CPU/GPU has bf16 matrix units, else
            float32), ``"float32"`` or ``"bfloat16"``; see :mod:`mi_peft.precision`.
        localization: a ``LocalizationResult`` saved next to the adapter for provenance.
        **sft_args: any other ``trl.SFTConfig`` field (``gradient_accumulation_steps``, ...).

    Example:
        >>> result = sft(model, tok, rows, SparseConfig(heads={12: [3]}), max_steps=50)
        >>> result.model.save_pretrained("my-adapter")
    """
    from trl import SFTConfig, SFTTrainer

    common = {
        **_common_args(max_steps, learning_rate, batch_size, seed, precision),
        **_checkpointing(sft_args),
        "max_length": max_length,
        **sft_args,
    }
    return _run(
        SFTTrainer,
        SFTConfig,
        SFT_FORMATS,
        model,
        tokenizer,
        train_dataset,
        peft_config,
        output_dir,
        common,
        localization,
        callbacks,
    )


def dpo(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Dataset | str | os.PathLike | Sequence[Mapping[str, Any]],
    peft_config: PeftConfig | None = None,
    *,
    output_dir: str | os.PathLike = "runs/dpo",
    max_steps: int = 100,
    learning_rate: float = 1e-3,
    batch_size: int = 8,
    beta: float = 0.1,
    max_length: int | None = 256,
    seed: int = 0,
    precision: str = "auto",
    localization: Any | None = None,
    callbacks: Sequence[TrainerCallback] | None = None,
    **dpo_args: Any,
) -> TrainResult:
    """Direct preference optimisation of an adapter with TRL's ``DPOTrainer``.

    The reference model is the same network with the adapter disabled (TRL's behaviour for a
    PEFT model with ``ref_model=None``), so no second copy is held in memory.
    Rows need ``prompt``, ``chosen`` and ``rejected`` (strings or message lists); ``precision`` as in :func:`sft`.
    """
    from trl import DPOConfig, DPOTrainer

    common = {
        **_common_args(max_steps, learning_rate, batch_size, seed, precision),
        **_checkpointing(dpo_args),
        "beta": beta,
        "max_length": max_length,
    }
    return _run(
        DPOTrainer,
        DPOConfig,
        (DPO_FORMAT,),
        model,
        tokenizer,
        train_dataset,
        peft_config,
        output_dir,
        {**common, **dpo_args},
        localization,
        callbacks,
        ref_model=None,
    )
