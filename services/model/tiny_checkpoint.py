"""A tiny, offline, deterministic checkpoint with the Qwen3-VL architecture, for tests and local runs.

``python -m services.model.tiny_checkpoint OUT_DIR`` (``make tiny-model``) writes a directory that
``load_model_and_processor`` loads exactly like the hub model: config + safetensors weights (~5 MB),
generation config, the real Qwen BPE tokenizer (or a small fallback BPE when offline), image/video
processor configs and a chat template of our own.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SEED = 1234
DASHSCOPE_WHEEL = "dashscope-2.0.2-py3-none-any.whl"
DASHSCOPE_REQ = "dashscope==2.0.2"
TIKTOKEN_MEMBER = "dashscope/resources/qwen.tiktoken"
QWEN_RANKS = 151_643
VOCAB_SIZE = 151_936
CONTEXT_LENGTH = 262_144

# Qwen2's pre-tokenizer: single digits, contractions, letter runs, punctuation runs, whitespace.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The 26 added tokens of Qwen3 in id order from 151643. ``True``: special (skip_special_tokens drops
# it); tool, FIM and think tags are ordinary added tokens, so decoded output keeps them.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
ENDOFTEXT_ID = 151_643
IM_END_ID = 151_645


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------- model


def tiny_config() -> Any:
    """Qwen3-VL with every dimension shrunk but the real vocabulary and special ids (1.3 M parameters)."""
    from transformers import Qwen3VLConfig

    text = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 8,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "max_position_embeddings": CONTEXT_LENGTH,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
        "pad_token_id": ENDOFTEXT_ID,
    }
    vision = {
        "depth": 2,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 2,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "out_hidden_size": 8,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [0, 1],
    }
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)


def _reinit_weights(model: Any, seed: int) -> None:
    """Re-draw every >=2-D weight from N(0, 3/sqrt(fan_in)).

    With the library's small default init the tiny model greedily repeats one token forever, so tests
    comparing outputs (batched vs alone, seeds, resume) would pass vacuously. Large weights make the
    output depend on the input.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if param.dim() < 2:
                continue
            fan_in = math.prod(param.shape[1:])
            std = 3.0 / math.sqrt(fan_in)
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)


def _generation_config() -> Any:
    from transformers import GenerationConfig

    # Thinking-model sampling defaults from the model card (vision tasks).
    return GenerationConfig(
        bos_token_id=ENDOFTEXT_ID,
        pad_token_id=ENDOFTEXT_ID,
        eos_token_id=[IM_END_ID, ENDOFTEXT_ID],
        do_sample=True,
        temperature=1.0,
        top_p=0.95,
        top_k=20,
        repetition_penalty=1.0,
    )


def _write_model(out_dir: Path, seed: int) -> None:
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(tiny_config()).to(torch.float32)
    _reinit_weights(model, seed)
    model.generation_config = _generation_config()
    model.save_pretrained(out_dir)


# ------------------------------------------------------------------------------------------ tokenizer


def _dashscope_wheel(cache_dir: Path) -> Path | None:
    """The dashscope wheel (it carries Qwen's BPE ranks), downloaded once into ``cache_dir``."""
    wheel = cache_dir / DASHSCOPE_WHEEL
    if wheel.exists():
        return wheel
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", DASHSCOPE_REQ, "-d", str(cache_dir)]
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("could not download %s (%s)", DASHSCOPE_REQ, exc)
        return None
    return wheel if wheel.exists() else None


def read_qwen_ranks(wheel: Path) -> dict[bytes, int]:
    """Parse ``qwen.tiktoken`` (``<base64 token> <rank>`` per line) out of the wheel without installing it."""
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read(TIKTOKEN_MEMBER).decode("ascii")
    ranks: dict[bytes, int] = {}
    for line in text.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def ranks_to_vocab_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken ranks -> byte-level BPE vocab + merges.

    Every split of a token into two tokens becomes a merge, ordered by the rank of the merged token: BPE
    then merges exactly the pairs tiktoken would (lowest rank of the concatenation first).
    """
    table = _byte_to_unicode()

    def as_str(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {as_str(token): rank for token, rank in ranks.items()}
    keyed: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            left_rank, right_rank = ranks.get(left), ranks.get(right)
            if left_rank is not None and right_rank is not None:
                keyed.append((rank, left_rank, right_rank, left, right))
    keyed.sort()
    return vocab, [(as_str(left), as_str(right)) for _, _, _, left, right in keyed]


def _byte_level_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _fallback_vocab_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small byte-level BPE trained on a built-in corpus (ids differ from Qwen's)."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers.models import BPE

    corpus = [
        "The quick brown fox jumps over the lazy dog. user assistant system",
        "Describe this image. What happens in this video? Let me think step by step.",
        "0123456789 +-*/=()[]{}<>.,;:!?'\" \n\t",
    ] * 20
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def build_tokenizer(cache_dir: Path) -> tuple[Any, bool]:
    """The tokenizers.Tokenizer with the 26 added tokens at their real ids; True when it is the real BPE."""
    from tokenizers import AddedToken

    wheel = _dashscope_wheel(cache_dir)
    real = False
    if wheel is not None:
        try:
            vocab, merges = ranks_to_vocab_merges(read_qwen_ranks(wheel))
            real = len(vocab) == QWEN_RANKS
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            log.warning("unusable %s (%s)", wheel, exc)
    if not real:
        log.warning("real Qwen BPE unavailable: using a small fallback BPE (token ids differ from Qwen's)")
        vocab, merges = _fallback_vocab_merges()
    # The added tokens sit in the model vocab at their real ids, so the fallback keeps them too.
    for offset, (content, _) in enumerate(ADDED_TOKENS):
        vocab[content] = ENDOFTEXT_ID + offset
    tok = _byte_level_tokenizer(vocab, merges)
    tok.add_tokens([AddedToken(c, special=s, normalized=False) for c, s in ADDED_TOKENS])
    return tok, real


def _tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": CONTEXT_LENGTH,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
    }


def _write_tokenizer(out_dir: Path, cache_dir: Path) -> bool:
    tok, real = build_tokenizer(cache_dir)
    tok.save(str(out_dir / "tokenizer.json"), pretty=False)  # compact: the pretty form is ~19 MB
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config())
    return real


# ------------------------------------------------------------------------------------------ processor


def _processor_configs() -> dict[str, dict[str, Any]]:
    """Image and video processor configs shaped like the real Qwen3-VL repository's."""
    common = {
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "Qwen3VLProcessor",
    }
    image = {
        **common,
        "size": {"longest_edge": 16_777_216, "shortest_edge": 65_536},
        "image_processor_type": "Qwen2VLImageProcessorFast",
    }
    video = {
        **common,
        "size": {"longest_edge": 25_165_824, "shortest_edge": 4_096},
        "video_processor_type": "Qwen3VLVideoProcessor",
    }
    return {"preprocessor_config.json": image, "video_preprocessor_config.json": video}


def chat_template_text() -> str:
    return (Path(__file__).with_name("chat_template.jinja")).read_text()


def _write_processor(out_dir: Path) -> None:
    for name, cfg in _processor_configs().items():
        _write_json(out_dir / name, cfg)
    (out_dir / "chat_template.jinja").write_text(chat_template_text())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------- build


def build_tiny_checkpoint(out_dir: Path, seed: int = SEED, cache_dir: Path | None = None) -> Path:
    """Write the tiny checkpoint into ``out_dir`` (created; existing files overwritten) and return it.

    ``cache_dir`` holds the downloaded dashscope wheel (default ``<repo>/.cache/wheels``). The files are
    written into a sibling temp directory and renamed into place, so a concurrent reader never sees a
    half-written checkpoint.
    """
    out_dir = Path(out_dir)
    cache_dir = cache_dir or _repo_root() / ".cache" / "wheels"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-new-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private
        _write_model(tmp, seed)
        real = _write_tokenizer(tmp, cache_dir)
        _write_processor(tmp)
        for path in tmp.iterdir():
            path.chmod(0o644)  # some writers create private files; the checkpoint is read by services
        _swap_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("tiny checkpoint at %s (real Qwen BPE: %s)", out_dir, real)
    return out_dir


def ensure_tiny_checkpoint(out_dir: Path) -> Path:
    """The checkpoint at ``out_dir``: built when missing; its chat template refreshed (atomic rename) when
    ours changed since it was built (the weights and tokenizer do not depend on the template)."""
    out_dir = Path(out_dir)
    if not (out_dir / "config.json").exists():
        return build_tiny_checkpoint(out_dir)
    path, text = out_dir / "chat_template.jinja", chat_template_text()
    if not path.exists() or path.read_text() != text:
        tmp = path.with_name(f".chat_template.{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.chmod(0o644)
        os.replace(tmp, path)
    return out_dir


def _swap_into_place(new: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``new`` with renames only. When a concurrent build (another test process)
    got there first, its identical result is kept."""
    trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-old-", dir=out_dir.parent))
    # Nothing to replace, or a concurrent build moved it already.
    with contextlib.suppress(FileNotFoundError):
        out_dir.rename(trash / "ckpt")
    try:
        new.rename(out_dir)
    except OSError:
        if not (out_dir / "config.json").exists():
            raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m services.model.tiny_checkpoint OUT_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    out = build_tiny_checkpoint(Path(args[0]))
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"built {out} ({size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
