"""Export adapters to formats other tools load: standard PEFT LoRA, llama.cpp control vectors and LoRA GGUFs."""

from .gguf import from_gguf_control_vector, to_gguf_control_vector, to_gguf_lora
from .lora import public_base_id, to_lora

__all__ = ["from_gguf_control_vector", "public_base_id", "to_gguf_control_vector", "to_gguf_lora", "to_lora"]
