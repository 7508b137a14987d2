"""Export adapters to formats other tools load: standard PEFT LoRA and llama.cpp control vectors."""

from .gguf import from_gguf_control_vector, to_gguf_control_vector
from .lora import to_lora

__all__ = ["from_gguf_control_vector", "to_gguf_control_vector", "to_lora"]
