"""A checkpoint directory of the real Qwen3-VL-2B architecture with random weights, written offline.

The config is Qwen/Qwen3-VL-2B-Thinking's public one (2.13 B parameters); the tokenizer, processor configs,
chat template and generation config are the tiny checkpoint's files (the real Qwen BPE, our template), so
the service loads the directory exactly like the hub model. Decode speed depends on the shapes only, so
random weights measure what the real ones would.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

VOCAB_SIZE = 151_936
ENDOFTEXT_ID = 151_643
CONTEXT_LENGTH = 262_144

REAL_2B_TEXT: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "attention_bias": False,
    "max_position_embeddings": CONTEXT_LENGTH,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 5_000_000.0,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    },
    "pad_token_id": ENDOFTEXT_ID,
}
REAL_2B_VISION: dict[str, Any] = {
    "depth": 24,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_heads": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "patch_size": 16,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "in_channels": 3,
    "out_hidden_size": 2048,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [5, 11, 17],
}
# The tiny checkpoint's shapes (services/model/tiny_checkpoint.py): the dry run exercises the same path.
TINY_TEXT: dict[str, Any] = {
    **REAL_2B_TEXT,
    "hidden_size": 8,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "rope_parameters": {**REAL_2B_TEXT["rope_parameters"], "mrope_section": [2, 1, 1]},
}
TINY_VISION: dict[str, Any] = {
    **REAL_2B_VISION,
    "depth": 2,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_heads": 2,
    "out_hidden_size": 8,
    "deepstack_visual_indexes": [0, 1],
}
# Everything of the tiny checkpoint but its weights and its config.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "chat_template.jinja",
    "generation_config.json",
)
STAMP = "gpu-check.json"


def architecture(tiny: bool = False) -> dict[str, Any]:
    """The config dict: ``text_config``, ``vision_config``, tied embeddings (the 2B's, or the tiny's)."""
    text, vision = (TINY_TEXT, TINY_VISION) if tiny else (REAL_2B_TEXT, REAL_2B_VISION)
    return {"text_config": dict(text), "vision_config": dict(vision), "tie_word_embeddings": True}


def build_checkpoint(
    out_dir: Path, tokenizer_dir: Path, arch: dict[str, Any], device: str, dtype: Any, seed: int = 0
) -> Path:
    """Write ``arch`` with random weights (``dtype``, initialised on ``device``) and ``tokenizer_dir``'s
    tokenizer/processor files into ``out_dir``; reuse it when a previous run wrote the same ``arch``.

    Raises:
        FileNotFoundError: ``tokenizer_dir`` lacks one of ``TOKENIZER_FILES``.
    """
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    wanted = {"arch": arch, "dtype": str(dtype)}
    stamp = out_dir / STAMP
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        log.info("reusing the checkpoint at %s", out_dir)
        return out_dir
    missing = [name for name in TOKENIZER_FILES if not (tokenizer_dir / name).exists()]
    if missing:
        raise FileNotFoundError(f"{tokenizer_dir} lacks {', '.join(missing)}")
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = Qwen3VLConfig(**arch)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.save_pretrained(out_dir)
    del model
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, out_dir / name)
    stamp.write_text(json.dumps(wanted))
    log.info("wrote %s in %.1f s", out_dir, time.perf_counter() - started)
    return out_dir


def tokenizer_source(repo: Path, wheel_dir: Path) -> Path:
    """The tiny checkpoint at ``TINY_MODEL_DIR`` or ``repo/.cache/tiny-qwen3-vl`` (built when missing; its
    tokenizer from the dashscope wheel in ``wheel_dir`` when there is no network, as on the GPU machines)."""
    from services.model.tiny_checkpoint import build_tiny_checkpoint, ensure_tiny_checkpoint

    tiny = Path(os.environ.get("TINY_MODEL_DIR", repo / ".cache" / "tiny-qwen3-vl"))
    if (tiny / "config.json").exists():
        return ensure_tiny_checkpoint(tiny)
    return build_tiny_checkpoint(tiny, cache_dir=wheel_dir)
