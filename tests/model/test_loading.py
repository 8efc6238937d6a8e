"""The production loading path, exercised on the tiny checkpoint (offline)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import torch
from transformers import GenerationConfig

from services.model import loading
from services.model.loading import (
    ModelLoadError,
    auto_cpu_threads,
    configure_torch_threads,
    load_model_and_processor,
)
from services.model.multimodal import processor_cpu
from services.model.settings import ModelSettings


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> loading.Loaded:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return load_model_and_processor(ModelSettings(model_repo_id=str(tiny_model_dir)))


def test_loads_tiny_checkpoint(loaded: loading.Loaded, tiny_model_dir: Path) -> None:
    assert type(loaded.model).__name__ == "Qwen3VLForConditionalGeneration"
    assert not loaded.model.training
    assert loaded.device == torch.device("cpu")
    assert loaded.dtype == torch.float32
    assert loaded.model_id == str(tiny_model_dir)
    assert loaded.context_length == 262_144
    assert loaded.eos_token_ids == (151645, 151643)
    assert loaded.pad_token_id == 151643
    assert loaded.sampling == loading.SamplingDefaults(
        do_sample=True, temperature=1.0, top_p=0.95, top_k=20, repetition_penalty=1.0
    )
    assert loaded.processor.chat_template
    assert loaded.generation_config.eos_token_id == [151645, 151643]


def test_processor_is_torch_free_without_torchvision(loaded: loading.Loaded) -> None:
    if processor_cpu.torchvision_available():
        pytest.skip("torchvision present: the stock AutoProcessor is used")
    assert isinstance(loaded.processor.video_processor, processor_cpu.TorchFreeQwen3VLVideoProcessor)
    assert type(loaded.processor).__name__ == "Qwen3VLProcessor"


def test_missing_local_directory_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_and_processor(ModelSettings(model_repo_id=str(missing)))


def test_offline_unknown_hub_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    secret = "hf_topsecret_value_123"
    settings = ModelSettings(model_repo_id="nobody-here/no-such-model", hf_token=secret)
    with pytest.raises(ModelLoadError) as info:
        load_model_and_processor(settings)
    message = str(info.value)
    assert "no-such-model" in message and "HF_HUB_OFFLINE=1" in message
    assert secret not in message


def test_directory_without_weights_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"failed to load model|not found"):
        load_model_and_processor(ModelSettings(model_repo_id=str(tmp_path)))


def test_device_and_dtype_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loading.resolve_device_map("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loading.resolve_device_map("auto") == "cuda"
    assert loading.resolve_device_map("cuda:1") == "cuda:1"
    assert loading.resolve_dtype("auto", "cpu") == torch.float32
    assert loading.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert loading.resolve_dtype("float16", "cpu") == torch.float16


def test_sampling_defaults_fall_back_to_model_card() -> None:
    gen = GenerationConfig()
    gen.temperature = gen.top_p = gen.top_k = None
    defaults = loading.sampling_defaults(gen)
    assert (defaults.temperature, defaults.top_p, defaults.top_k) == (1.0, 0.95, 20)
    assert loading.sampling_defaults(GenerationConfig(temperature=0.6, top_k=5)).temperature == 0.6


def test_hub_offline_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not loading.hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    assert loading.hub_offline()


def _wrapped(inner: Exception) -> OSError:
    """What transformers raises: a plain OSError whose context is the hub's error."""
    try:
        try:
            raise inner
        except Exception as exc:
            raise OSError("could not load the files") from exc
    except OSError as outer:
        return outer


def test_load_errors_are_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    explain = loading._explain
    assert "could not be reached" in explain("a/b", _wrapped(LocalEntryNotFoundError("x")), None)
    response = httpx.Response(404, request=httpx.Request("GET", "https://hub.invalid/a/b"))
    missing = RepositoryNotFoundError("x", response=response)
    assert "not found on the hub" in explain("a/b", _wrapped(missing), None)
    assert "gated" in explain("a/b", _wrapped(GatedRepoError("x", response=response)), None)
    message = explain("a/b", RuntimeError("boom with hf_secret inside"), "hf_secret")
    assert message.startswith("failed to load model 'a/b'") and "hf_secret" not in message


def test_torch_threads_explicit_auto_and_omp(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        assert configure_torch_threads(2, "cpu") == 2
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert (
            configure_torch_threads(0, "cpu")
            == auto_cpu_threads()
            == max(1, len(os.sched_getaffinity(0)) - 1)
        )
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert configure_torch_threads(0, "cpu") == 2  # the operator's OMP_NUM_THREADS wins over auto
        assert configure_torch_threads(0, "cuda") == 2  # on a GPU torch keeps its own default
    finally:
        torch.set_num_threads(before)


def test_a_processor_that_bypasses_the_per_item_media_hooks_stops_the_load(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers.processing_utils import ProcessorMixin

    hub = {"token": None, "local_files_only": True}
    cls = type(loading._load_processor(str(tiny_model_dir), hub))  # the pinned transformers passes
    call = cls.__call__

    def old_style_call(self: object, *args: object, **kwargs: object) -> object:
        # as a transformers whose processor runs its video processor without _process_videos would
        self._process_videos = ProcessorMixin._process_videos.__get__(self)  # type: ignore[attr-defined]
        return call(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", old_style_call)
    with pytest.raises(ModelLoadError, match=r"_process_videos.*transformers==5\.24\.0"):
        loading._load_processor(str(tiny_model_dir), hub)
