"""``python -m bench.gpu`` (``make gpu-check``): see ``bench/gpu/__init__.py`` and ``--help``.

Exit status: 0 when every phase ran, 1 when some failed (the report lists them), 2 for bad arguments,
3 when no CUDA device is visible and ``--cpu-dry-run`` was not given (nothing is written then).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from bench.gpu.plan import EXIT_NO_CUDA, NO_CUDA_MESSAGE, Plan, cuda_available, parse_args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu_dry_run and not cuda_available():
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return EXIT_NO_CUDA
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bench.gpu.report import render_markdown
    from bench.gpu.run import execute

    report = asyncio.run(execute(args, Plan.from_args(args)))
    print(render_markdown(report))
    print(f"wrote {args.out}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # an engine thread left behind by a timed-out phase must not hold the exit
