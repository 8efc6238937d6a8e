"""Launch ``transformers serve`` on a machine without torchvision (the baseline of the benchmark).

    python -m bench.tf_serve MODEL_DIR --port 8123 [--continuous-batching] [other `serve` options]

Qwen3-VL's stock ``AutoProcessor`` needs torchvision, which must not be installed on CPU machines. Before
the CLI starts, this shim (1) exports ``transformers.VideoProcessorMixin`` (exported only with torchvision)
and (2) makes the server's ``ModelManager`` load its processor through the project's torchvision-free
loader (``services.model.multimodal.processor_cpu.load_processor``). Everything else is the library's own
server, run through its own Typer entry point (``transformers.cli.transformers.app``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any


def install_processor_shim() -> None:
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.utils import split_revision

    from services.model.multimodal import processor_cpu

    processor_cpu._export_video_processor_mixin()

    def _load_processor(self: ModelManager, model_id_and_revision: str, gguf_file: str | None = None) -> Any:
        model_id, revision = split_revision(model_id_and_revision)
        kwargs: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if revision is not None and revision != "main":
            kwargs["revision"] = revision
        return processor_cpu.load_processor(model_id, **kwargs)

    ModelManager._load_processor = _load_processor  # type: ignore[method-assign]


def main(argv: Sequence[str] | None = None) -> None:
    install_processor_shim()
    from transformers.cli.transformers import app

    # The library's CLI entry point minus its update check (no network here).
    app(args=["serve", *(sys.argv[1:] if argv is None else argv)], prog_name="transformers")


if __name__ == "__main__":
    main()
