"""The Qwen3-VL processor on machines without torchvision.

On CPU machines torchvision must not be installed (the registry's build is CUDA-only and breaks
``import transformers`` model classes). The stock ``AutoProcessor`` then fails for Qwen3-VL: the image
processor falls back to its PIL backend by itself, but ``Qwen3VLVideoProcessor`` uses torchvision for
exactly three operations. ``TorchFreeQwen3VLVideoProcessor`` redoes those with plain torch, and the
processor is assembled by hand. Where torchvision is importable (the CUDA image) the stock path is used.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor, smart_resize


def torchvision_available() -> bool:
    """transformers' own answer: when it believes torchvision is there, its stock classes use it."""
    from transformers.utils import is_torchvision_available

    return bool(is_torchvision_available())


class TorchFreeQwen3VLVideoProcessor(Qwen3VLVideoProcessor):
    """``Qwen3VLVideoProcessor`` with RGB conversion, resize and normalize in plain torch."""

    def convert_to_rgb(self, video: torch.Tensor) -> torch.Tensor:
        """(T, C, H, W) uint8 -> 3 channels: grey is repeated, RGBA is composited over white."""
        channels = video.shape[-3]
        if channels == 1:
            return video.expand(*video.shape[:-3], 3, *video.shape[-2:]).contiguous()
        if channels == 4:
            rgb = video[..., :3, :, :].to(torch.float32)
            alpha = video[..., 3:, :, :].to(torch.float32) / 255.0
            blended = rgb * alpha + 255.0 * (1.0 - alpha)
            return blended.round().clamp(0, 255).to(video.dtype)
        return video

    def resize(  # type: ignore[override]
        self,
        videos: torch.Tensor,
        size: Any,
        resample: Any = None,
        factor: int | None = None,
        temporal_factor: int | None = None,
        cap_pixels_per_frame: bool | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Same target size as the parent (``smart_resize`` with the optional per-frame cap), then a
        bicubic antialiased resize like torchvision's on uint8 (rounded and clamped)."""
        factor = factor or self.patch_size * self.merge_size
        temporal_factor = temporal_factor or self.temporal_patch_size
        height, width = self._target_size(videos, size, factor, temporal_factor, cap_pixels_per_frame)
        return bicubic_resize(videos, height, width)

    def _target_size(
        self, videos: torch.Tensor, size: Any, factor: int, temporal_factor: int, cap: bool | None
    ) -> tuple[int, int]:
        if not size.shortest_edge or not size.longest_edge:
            raise ValueError(f"`size` must have 'shortest_edge' and 'longest_edge', got {size}")
        num_frames = videos.shape[1]
        max_pixels = size.longest_edge
        if cap:
            frame_cap = self.max_video_tokens * factor * factor
            per_frame = max(min(frame_cap, size.longest_edge // num_frames), int(size.shortest_edge * 1.05))
            max_pixels = per_frame * num_frames
        height, width = videos.shape[-2:]
        return smart_resize(
            num_frames=num_frames,
            height=height,
            width=width,
            temporal_factor=temporal_factor,
            factor=factor,
            min_pixels=size.shortest_edge,
            max_pixels=max_pixels,
        )

    def normalize(  # type: ignore[override]
        self,
        image: torch.Tensor,
        mean: float | Iterable[float] | torch.Tensor,
        std: float | Iterable[float] | torch.Tensor,
        inplace: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Per-channel ``(x - mean) / std`` on a (..., C, H, W) float tensor."""
        mean_t = torch.as_tensor(mean, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
        std_t = torch.as_tensor(std, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
        if inplace:
            return image.sub_(mean_t).div_(std_t)
        return (image - mean_t) / std_t


def bicubic_resize(videos: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize (..., C, H, W) to (height, width), bicubic with antialiasing; uint8 stays uint8.

    What torchvision's tensor resize does for bicubic: interpolate in float, then round and clamp."""
    if tuple(videos.shape[-2:]) == (height, width):
        return videos
    lead = videos.shape[:-3]
    flat = videos.reshape(-1, *videos.shape[-3:]).to(torch.float32)
    out = F.interpolate(flat, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    if videos.dtype == torch.uint8:
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out.reshape(*lead, *out.shape[-3:])


def _export_video_processor_mixin() -> None:
    """``ProcessorMixin`` checks a video processor against ``transformers.VideoProcessorMixin``, which the
    package exports only when torchvision is present; export it so a hand-built processor validates."""
    import transformers
    from transformers import video_processing_utils

    if not hasattr(transformers, "VideoProcessorMixin"):
        transformers.VideoProcessorMixin = video_processing_utils.VideoProcessorMixin  # type: ignore[attr-defined]


def load_processor(source: str, **hub_kwargs: Any) -> Any:
    """The Qwen3-VL processor for a hub id or local directory.

    ``hub_kwargs`` (``token``, ``local_files_only``, ``revision``, ...) go to every ``from_pretrained``.
    """
    from transformers import AutoProcessor

    if torchvision_available():
        return AutoProcessor.from_pretrained(source, **hub_kwargs)
    return build_torch_free_processor(source, **hub_kwargs)


def build_torch_free_processor(source: str, **hub_kwargs: Any) -> Any:
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLProcessor

    _export_video_processor_mixin()
    tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs)
    image_processor = AutoImageProcessor.from_pretrained(source, **hub_kwargs)
    video_processor = TorchFreeQwen3VLVideoProcessor.from_pretrained(source, **hub_kwargs)
    processor_dict, _ = Qwen3VLProcessor.get_processor_dict(source, **hub_kwargs)
    chat_template = processor_dict.get("chat_template") or tokenizer.chat_template
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=chat_template,
    )
