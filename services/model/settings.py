"""Model service settings: every variable validated at start; a bad value stops the service naming it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ModelSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    # where and what
    host: str = Field(default="127.0.0.1", validation_alias="MODEL_HOST")
    port: int = Field(default=8001, ge=1, le=65535, validation_alias="MODEL_PORT")
    model_repo_id: str = "Qwen/Qwen3-VL-2B-Thinking"
    hf_token: SecretStr | None = None
    engine: Literal["hf", "fake"] = Field(default="hf", validation_alias="ENGINE")
    device_map: str = "auto"
    torch_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # CPU threads for torch; 0 = auto: on a CPU device one fewer than the usable cores (the api, the edge and
    # the event loop need the rest), unless OMP_NUM_THREADS says otherwise; on CUDA torch's own default.
    torch_threads: int = Field(default=0, ge=0, le=1024)
    # ENGINE=hf: run the model and its scheduler thread in a child process (services/model/engine/process.py),
    # so the HTTP event loop never holds the GIL the decode steps need
    engine_process: bool = Field(default=True, validation_alias="ENGINE_PROCESS")
    # a dead engine process is replaced (weights reloaded) after a back-off that starts here and doubles
    # with each restart within the window (at most 60 s); more than ENGINE_MAX_RESTARTS deaths or failed
    # reloads within the window and the service gives up: /health answers 503 (the orchestrator restarts it)
    engine_max_restarts: int = Field(default=5, ge=0)
    engine_restart_window_seconds: float = Field(default=600.0, gt=0.0)
    engine_restart_backoff_seconds: float = Field(default=1.0, ge=0.0, le=600.0)

    # generation defaults (None: the checkpoint's generation_config.json decides)
    max_tokens: int = Field(default=1024, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)

    # media limits
    max_video_frames: int = Field(default=32, ge=1, le=768)
    max_image_pixels: int = Field(default=16_777_216, ge=1024)  # decoded pixels per image (bomb guard)
    max_media_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)  # per decoded media item
    max_images_per_request: int = Field(default=16, ge=0)
    max_videos_per_request: int = Field(default=2, ge=0)
    # decoded pixels of all images and video frames of one request together (memory guard)
    max_request_pixels: int = Field(default=128 * 1024 * 1024, ge=1024)
    # visual tokens per image (32x32 pixels each for Qwen3-VL; larger images are downscaled, never refused):
    # 1280 = ~1.3 megapixels; the model's own maximum is 16384 (16.7 megapixels)
    max_image_tokens: int = Field(default=1280, ge=4, le=16384)
    # visual tokens per video temporal patch (2 frames); the model's reference is 768
    max_video_frame_tokens: int = Field(default=256, ge=4, le=16384)
    # visual tokens of an image sent with `detail: "low"` (64 = 65,536 pixels, e.g. 256 x 256)
    low_detail_image_tokens: int = Field(default=64, ge=4, le=16384)

    # scheduling and limits
    max_batch_size: int = Field(default=16, ge=1, le=512)
    max_queue: int = Field(default=64, ge=0)
    max_step_tokens: int = Field(default=2048, ge=16)  # prefill token budget per scheduler step
    # longest a JSON schema's grammar may take to compile (response_format, a forced tool call); past it the
    # request is refused (400, "too complex") and the schema remembered as such
    grammar_compile_seconds: float = Field(default=5.0, gt=0.0, le=600.0)
    # KV cache memory in bytes: the running rows' keys/values plus the kept prompt prefixes; a request whose
    # own KV (prompt + max_tokens) cannot fit is refused (400), one that cannot fit now waits for room
    kv_cache_bytes: int = Field(default=4 * 1024**3, ge=1024 * 1024)
    # keep prefilled prompts' KV (within KV_CACHE_BYTES, least recently used out first) and prefill a later
    # prompt that shares a prefix (same tokens, same images/videos) from where it differs
    prefix_cache: bool = True
    # bytes of processed images/videos (the processor's pixel tensors) kept by their raw bytes and parameters,
    # so that a resent item (the next turn of a chat) is not decoded, resized and hashed again; least
    # recently used out first; 0 disables
    media_cache_bytes: int = Field(default=512 * 1024 * 1024, ge=0)
    # how the running batch's KV is held: concat (one transformers DynamicCache, re-concatenated on every
    # decode step, join and leave) or slots (engine/kv_slots.py: each row keeps its KV in its own slot of
    # preallocated buffers; a join copies only the newcomer, a leave copies nothing, a step writes in place).
    # concat by default. slots was faster on the tiny CPU checkpoint (make bench (g), 16 rows: steady 1.15 vs
    # 1.24 ms/step, join-heavy 0.93 of concat's), but under a KV_CACHE_BYTES budget it reserves a whole slot
    # bucket (9 rows reserve 16 slots): at the real model's size the default 4 GiB would run about half as
    # many mid-length requests at once. On an H200 slots + KV_STATIC_SHAPES + CUDA_GRAPHS decode 16 rows in
    # 10.2 ms/step against 110 with concat (bench/results/README.md): the GPU deployments set those three
    kv_layout: Literal["concat", "slots"] = "concat"
    # KV_LAYOUT=slots: every decode step spans the whole slot bucket and column capacity (fixed shapes per
    # bucket, what CUDA graph capture needs) instead of the slots and columns in use; slower on CPU. With
    # KV_LAYOUT=concat it has no effect: the engine logs a warning at start
    kv_static_shapes: bool = False
    # replay the decode step's forward from a CUDA graph captured per slot-buffer shape (engine/kv_slots.py):
    # needs KV_LAYOUT=slots, KV_STATIC_SHAPES=true and the decoder on one CUDA device, else a warning at start
    # says it has no effect. Off by default (no effect on CPU); the GPU deployments turn it on: on the lent
    # H200 the eager decode step is bound by launching ~1,600 kernels, and a replayed step-shaped forward took
    # 4.4 ms against 30 ms eager (bench/results/README.md, GPU check)
    cuda_graphs: bool = False
    finished_retention_seconds: float = Field(default=600.0, ge=0.0)
    # bytes of finished generations' (compacted) logs kept for re-attach in all; the oldest go first
    finished_retention_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    # least time between two writes of one generation's stream (0: one write per engine step); the first
    # and the last event are never held back. Each write costs a socket send here and a parse in the api
    # (make bench @16: the api's CPU per token 0.09-0.11 -> 0.05-0.06 ms going from 10 to 25 ms; a profile
    # at 25 showed the model service's event loop ~28% in socket sends). 50: the full stack @16 on 2 cores,
    # 12 runs each, median 2640 tok/s vs 2375 at 25; 20 text updates a second still read as a stream
    stream_interval_ms: float = Field(default=50.0, ge=0.0, le=1000.0)
    shutdown_grace_seconds: float = Field(default=30.0, ge=0.0)

    internal_token: SecretStr | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # ENGINE=fake only (deterministic engine for fast tests; see services/model/engine/fake.py)
    fake_step_seconds: float = Field(default=0.005, ge=0.0, le=10.0)  # one decode step
    fake_load_seconds: float = Field(default=0.0, ge=0.0, le=600.0)  # simulated weight loading
    fake_context_tokens: int = Field(default=4096, ge=16)  # prompt + max_tokens limit


def log_secrets(settings: ModelSettings) -> list[str]:
    """Strings the logs must never show (``HF_TOKEN``, ``INTERNAL_TOKEN``), for
    ``services.protocol.logs.configure_logging``."""
    return [s.get_secret_value() for s in (settings.hf_token, settings.internal_token) if s is not None]
