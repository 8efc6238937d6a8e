"""The one loading path for the real hub model and the tiny local checkpoint alike.

``MODEL_REPO_ID`` is a hub id or a local directory; ``HF_TOKEN`` goes to the hub as ``token`` and is never
logged; ``HF_HUB_OFFLINE`` is honoured at call time. Failures become ``ModelLoadError`` with a message that
the model service shows on ``/ready``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.model.settings import ModelSettings

log = logging.getLogger(__name__)

# Model-card sampling for Qwen3-VL Thinking (vision tasks), used where the checkpoint's
# generation_config.json says nothing.
CARD_TEMPERATURE = 1.0
CARD_TOP_P = 0.95
CARD_TOP_K = 20


class ModelLoadError(RuntimeError):
    """The weights or the processor could not be loaded; the message is safe to show to operators."""


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    """Sampling values the checkpoint recommends (its generation config, else the model card)."""

    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float


@dataclass(slots=True)
class Loaded:
    model: Any  # Qwen3VLForConditionalGeneration, in eval mode
    processor: Any  # Qwen3VLProcessor
    device: Any  # torch.device of the model's inputs (its first parameter's device)
    dtype: Any  # torch.dtype of the weights
    model_id: str  # MODEL_REPO_ID as configured (served model name)
    generation_config: Any  # transformers.GenerationConfig of the checkpoint
    sampling: SamplingDefaults
    context_length: int  # text_config.max_position_embeddings
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_device_map(device_map: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else is passed through as is
    (``cpu``, ``cuda:1``, or an accelerate strategy such as ``balanced``)."""
    import torch

    if device_map == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device_map


def auto_cpu_threads() -> int:
    """The automatic CPU thread count: one fewer than the cores this process may use (at least 1)."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def configure_torch_threads(requested: int, device_map: str) -> int:
    """Set torch's intra-op thread count (see ``TORCH_THREADS``) and return the count in force.

    On a CPU device torch defaults to every core, which then fights the api workers, nginx and this process's
    own event loop for them; measured on 2 cores, one thread was steadier and faster than two.
    """
    import torch

    if requested > 0:
        torch.set_num_threads(requested)
    elif device_map == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(auto_cpu_threads())
    return torch.get_num_threads()


def resolve_dtype(torch_dtype: str, device_map: str) -> Any:
    """``auto`` -> bfloat16 on CUDA, float32 on CPU (bf16 matmuls are slow on most CPUs)."""
    import torch

    if torch_dtype == "auto":
        return torch.float32 if device_map == "cpu" else torch.bfloat16
    return getattr(torch, torch_dtype)


def _library_output_as_logs() -> None:
    """The service's stderr is JSON lines (``services.protocol.logs``): transformers' warnings go through the
    root logger instead of its own plain-text handler; no progress bars (hub downloads, weight loading)."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def load_model_and_processor(settings: ModelSettings) -> Loaded:
    """Load the model (``AutoModelForImageTextToText``) and its processor, ready for inference."""
    _library_output_as_logs()
    source = _check_source(settings.model_repo_id)
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    hub_kwargs: dict[str, Any] = {"token": token, "local_files_only": hub_offline()}
    device_map = resolve_device_map(settings.device_map)
    dtype = resolve_dtype(settings.torch_dtype, device_map)
    threads = configure_torch_threads(settings.torch_threads, device_map)
    start = time.perf_counter()
    try:
        model = _load_model(source, device_map, dtype, hub_kwargs)
        processor = _load_processor(source, hub_kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(_explain(settings.model_repo_id, exc, token)) from None
    from services.model.multimodal.limits import cap_visual_tokens

    image_cap, frame_cap = cap_visual_tokens(
        processor, settings.max_image_tokens, settings.max_video_frame_tokens
    )
    loaded = _assemble(settings.model_repo_id, model, processor)
    log.info(
        "loaded %s on %s (%s, %d torch threads) in %.1f s; context %d tokens; at most %d visual tokens "
        "per image, %d per video frame pair",
        settings.model_repo_id,
        loaded.device,
        str(loaded.dtype).removeprefix("torch."),
        threads,
        time.perf_counter() - start,
        loaded.context_length,
        image_cap,
        frame_cap,
    )
    return loaded


def _check_source(repo_id: str) -> str:
    """A local directory stays a path; something that looks like a path but is missing fails clearly
    (otherwise the hub client reports it as an invalid repo id)."""
    path = Path(repo_id).expanduser()
    if path.is_dir():
        return str(path)
    looks_local = repo_id.startswith((".", "/", "~")) or repo_id.count("/") > 1 or path.exists()
    if looks_local:
        raise ModelLoadError(f"model directory '{repo_id}' does not exist or is not a directory")
    return repo_id


def _load_model(source: str, device_map: str, dtype: Any, hub_kwargs: dict[str, Any]) -> Any:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        source, dtype=dtype, device_map=device_map, **hub_kwargs
    )
    model.eval()
    return model


def _load_processor(source: str, hub_kwargs: dict[str, Any]) -> Any:
    from services.model.multimodal.processor_cpu import load_processor
    from services.model.multimodal.prompt import MediaRoutingError, check_media_routing

    processor = load_processor(source, **hub_kwargs)
    if getattr(processor, "chat_template", None) is None:
        raise ModelLoadError(f"model '{source}' has no chat template")
    try:
        check_media_routing(processor)
    except MediaRoutingError as exc:
        raise ModelLoadError(str(exc)) from None
    return processor


def _assemble(model_id: str, model: Any, processor: Any) -> Loaded:
    gen = model.generation_config
    param = next(model.parameters())
    text_config = getattr(model.config, "text_config", model.config)
    return Loaded(
        model=model,
        processor=processor,
        device=param.device,
        dtype=param.dtype,
        model_id=model_id,
        generation_config=gen,
        sampling=sampling_defaults(gen),
        context_length=int(text_config.max_position_embeddings),
        eos_token_ids=_eos_ids(gen, processor),
        pad_token_id=gen.pad_token_id if gen.pad_token_id is not None else processor.tokenizer.pad_token_id,
    )


def sampling_defaults(gen: Any) -> SamplingDefaults:
    def pick(name: str, fallback: Any) -> Any:
        value = getattr(gen, name, None) if gen is not None else None
        return fallback if value is None else value

    return SamplingDefaults(
        do_sample=bool(pick("do_sample", True)),
        temperature=float(pick("temperature", CARD_TEMPERATURE)),
        top_p=float(pick("top_p", CARD_TOP_P)),
        top_k=int(pick("top_k", CARD_TOP_K)),
        repetition_penalty=float(pick("repetition_penalty", 1.0)),
    )


def _eos_ids(gen: Any, processor: Any) -> tuple[int, ...]:
    eos = gen.eos_token_id if gen is not None else None
    if eos is None:
        eos = processor.tokenizer.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    return tuple(int(i) for i in ids)


def _explain(repo_id: str, exc: Exception, token: str | None) -> str:
    """One operator-readable sentence for a loading failure, with the token scrubbed out."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    detail = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    if token:
        detail = detail.replace(token, "***")
    if _caused_by(exc, GatedRepoError):
        msg = f"model '{repo_id}' is gated: HF_TOKEN is missing or has no access to it"
    elif _caused_by(exc, RepositoryNotFoundError):
        msg = f"model '{repo_id}' not found on the hub (or HF_TOKEN has no access to it)"
    elif hub_offline() and _caused_by(exc, OSError):
        msg = f"model '{repo_id}' not found locally and the hub is unreachable (HF_HUB_OFFLINE=1)"
    elif _caused_by(exc, LocalEntryNotFoundError):
        msg = (
            f"model '{repo_id}' is not in the local cache and the hub could not be reached "
            "(HF_HUB_OFFLINE=1 skips the hub)"
        )
    else:
        return f"failed to load model '{repo_id}': {detail[:500]}"
    return f"{msg} ({detail[:300]})"


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``exc`` or anything in its cause/context chain is a ``kind`` (transformers wraps hub
    errors in plain ``OSError``)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
