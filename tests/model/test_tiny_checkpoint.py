"""The tiny offline checkpoint: files, tokenizer ids, determinism, fallback tokenizer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from services.model import tiny_checkpoint as tc
from tests.helpers.env import missing

QWEN_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "<think>": 151667,
    "</think>": 151668,
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)


def test_files_are_complete_and_small(tiny_model_dir: Path) -> None:
    names = {p.name for p in tiny_model_dir.iterdir()}
    expected = {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
        "chat_template.jinja",
    }
    assert expected <= names
    assert (tiny_model_dir / "model.safetensors").stat().st_size < 10_000_000
    head = (tiny_model_dir / "tokenizer.json").read_text()[:4096]
    assert "\n" not in head, "tokenizer.json must be compact"


def test_generation_config_is_thinking_style(tiny_model_dir: Path) -> None:
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643]
    assert gen["pad_token_id"] == 151643
    assert gen["do_sample"] is True
    assert (gen["temperature"], gen["top_p"], gen["top_k"]) == (1.0, 0.95, 20)


def test_config_keeps_real_vocab_and_vision_ids(tiny_model_dir: Path) -> None:
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_vl"
    assert cfg["text_config"]["vocab_size"] == 151936
    assert (cfg["image_token_id"], cfg["video_token_id"]) == (151655, 151656)
    assert (cfg["vision_start_token_id"], cfg["vision_end_token_id"]) == (151652, 151653)
    assert cfg["vision_config"]["patch_size"] == 16
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        proc = json.loads((tiny_model_dir / name).read_text())
        assert (proc["patch_size"], proc["merge_size"], proc["temporal_patch_size"]) == (16, 2, 2)


def test_added_tokens_have_real_ids(tokenizer) -> None:
    assert tokenizer.convert_tokens_to_ids(list(QWEN_IDS)) == list(QWEN_IDS.values())
    contents = [c for c, _ in tc.ADDED_TOKENS]
    assert tokenizer.convert_tokens_to_ids(contents) == list(range(151643, 151669))
    assert tokenizer.eos_token_id == 151645
    assert tokenizer.pad_token_id == 151643


def test_think_tags_survive_skip_special_tokens(tokenizer) -> None:
    ids = tokenizer.encode("<think>\nhm</think>ok<|im_end|>", add_special_tokens=False)
    assert ids[0] == 151667 and 151668 in ids and ids[-1] == 151645
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>\nhm</think>ok"


def test_real_qwen_bpe_ids(tokenizer) -> None:
    if len(tokenizer) != 151669:
        missing("the real Qwen BPE (the checkpoint was built with the fallback: dashscope wheel unavailable)")
    assert tokenizer.encode("user", add_special_tokens=False) == [872]
    assert tokenizer.encode("\n", add_special_tokens=False) == [198]
    assert tokenizer.encode("Hello, world!", add_special_tokens=False) == [9707, 11, 1879, 0]
    text = "Ünïcödé 你好 123 <x>\t\n  end"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_ranks_to_vocab_merges_follows_rank_order() -> None:
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5}
    vocab, merges = tc.ranks_to_vocab_merges(ranks)
    assert vocab == {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5}
    # "abc" splits as a+bc and ab+c; both merge to rank 5, after the rank-3 and rank-4 merges.
    assert merges == [("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c")]


def test_byte_level_names_are_reversible() -> None:
    table = tc._byte_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"


def test_fallback_tokenizer_keeps_special_ids(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tc, "_dashscope_wheel", lambda cache_dir: None)
    tok, real = tc.build_tokenizer(tmp_path)
    assert real is False
    for content, expected in QWEN_IDS.items():
        assert tok.token_to_id(content) == expected
    enc = tok.encode("<|im_start|>user\nhello there<|im_end|>")
    assert enc.ids[0] == 151644 and enc.ids[-1] == 151645
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<|im_start|>user\nhello there<|im_end|>"


def test_model_weights_are_deterministic(tmp_path: Path) -> None:
    digests = []
    for name in ("a", "b"):
        out = tmp_path / name
        out.mkdir()
        tc._write_model(out, seed=tc.SEED)
        digests.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_cli_usage() -> None:
    assert tc.main([]) == 2


def test_wheel_download_failure_is_not_fatal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(tc.subprocess, "run", offline)
    assert tc._dashscope_wheel(tmp_path / "wheels") is None


def test_fallback_checkpoint_builds_and_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from services.model.loading import load_model_and_processor
    from services.model.multimodal.prompt import MediaLimits, build_inputs
    from services.model.settings import ModelSettings
    from services.protocol.generate import Message

    monkeypatch.setattr(tc, "_dashscope_wheel", lambda cache_dir: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "stale.txt").write_text("replaced by the build")
    assert tc.build_tiny_checkpoint(out) == out
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"], "no temp directories left behind"
    loaded = load_model_and_processor(ModelSettings(model_repo_id=str(out)))
    limits = MediaLimits(max_video_frames=4, max_image_pixels=1 << 20, max_media_bytes=1 << 20)
    ids = build_inputs(loaded.processor, [Message(role="user", content="hello")], limits)["input_ids"][0]
    assert ids[0].item() == 151644
    assert loaded.processor.tokenizer.decode(ids).endswith("<|im_start|>assistant\n<think>\n")
