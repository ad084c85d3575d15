"""scratchlm's network: config + presets, the Llama, KV-cache generation, HF-format checkpoints, losses, heads.

Imports torch, safetensors and the standard library only (tests/test_model_imports.py holds that line), so every
stage, the DeepSpeed trainer and the server can import it without pulling the orchestration stack.

    from model import ModelConfig, Llama, generate, stream, save, load, RewardModel
"""

from model.config import PRESETS, ModelConfig
from model.generate import generate, sample_next, stream
from model.heads import RewardModel
from model.hf import export_hf, import_hf, load, load_config, save
from model.llama import KVCache, Llama

__all__ = [
    "ModelConfig",
    "PRESETS",
    "Llama",
    "KVCache",
    "generate",
    "stream",
    "sample_next",
    "export_hf",
    "import_hf",
    "load",
    "load_config",
    "save",
    "RewardModel",
]
