"""``python -m bench.gpu.wheels`` (``make gpu-wheels``): the wheels a bare GPU machine lacks, into ``.whl/``.

The GPU machines this project is lent have python 3.12 with torch, torchvision, transformers and accelerate,
but no network and none of the service's web packages. This downloads, on a machine with network, every
package the model service and the api need beyond those, at the versions installed in this ``.venv``, as
CPython 3.12 manylinux x86_64 wheels (``--no-deps``: the list names each one). The GPU side installs them
with ``pip install --no-index --no-deps --target DIR .whl/*.whl`` (``make gpu-check`` does).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

# What the model service (and the api, run with uvicorn) import that the GPU image does not hold at a
# version we have tested: the web stack, its settings, PyAV (video decoding), our transformers pin and
# its `regex` floor. torch, torchvision, accelerate, numpy, pillow, jinja2, httpx, tokenizers,
# safetensors, huggingface-hub, click and h11 are there already.
PACKAGES: tuple[str, ...] = (
    "fastapi",
    "starlette",
    "annotated-doc",
    "opentelemetry-api",
    "anyio",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "pydantic-settings",
    "python-dotenv",
    "uvicorn",
    "prometheus-client",
    "av",
    "transformers",
    "regex",
)
# Carried at a version of their own rather than this .venv's: the image's huggingface-hub is a 1.x (its
# transformers 5.17 asks for <2), older than our transformers' floor (1.31), and hub 2.x needs httpx2, which
# the image lacks. 1.33.0 is the newest 1.x; it needs only httpx, which the image has.
OVERRIDES: dict[str, str] = {"huggingface-hub": "1.33.0"}
# pip matches a manylinux tag's glibc version exactly, so every one a wheel may carry is named.
PLATFORMS: tuple[str, ...] = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
PYTHON_VERSION = "3.12"
# The tiny checkpoint's tokenizer comes from this wheel's Qwen BPE ranks (services/model/tiny_checkpoint.py);
# it lies in .whl/data/ so that the install (.whl/*.whl) leaves it out.
DASHSCOPE_REQ = "dashscope==2.0.2"
DATA_DIR = "data"


def pinned(names: Sequence[str] = PACKAGES) -> list[str]:
    """``name==version`` for each name, the version installed in this interpreter's environment, then each
    of :data:`OVERRIDES` at its own version.

    Raises:
        importlib.metadata.PackageNotFoundError: a name is not installed here (run ``make install``).
    """
    own = [f"{name}=={importlib.metadata.version(name)}" for name in names]
    return own + [f"{name}=={version}" for name, version in OVERRIDES.items()]


def download_command(requirements: Sequence[str], dest: Path, python: str = sys.executable) -> list[str]:
    """The ``pip download`` argv that fetches ``requirements`` as cp312 manylinux x86_64 wheels into
    ``dest`` (binary only, no dependencies)."""
    argv = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet"]
    argv += ["--python-version", PYTHON_VERSION, "--implementation", "cp"]
    for platform in PLATFORMS:
        argv += ["--platform", platform]
    return [*argv, "-d", str(dest), *requirements]


def install_command(wheels_dir: Path, target: Path, python: str = "python3") -> list[str]:
    """The offline install the GPU side runs: every wheel of ``wheels_dir`` into ``target``."""
    wheels = sorted(str(p) for p in wheels_dir.glob("*.whl"))
    return [
        python,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--upgrade",
        "--target",
        str(target),
        *wheels,
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu.wheels", description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(".whl"), help="folder for the wheels (.whl)")
    args = parser.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    requirements = pinned()
    subprocess.run(download_command(requirements, args.dest), check=True)
    data = (
        args.dest / DATA_DIR
    )  # not installed: the tokenizer's source when the tiny checkpoint is built there
    data.mkdir(exist_ok=True)
    subprocess.run(download_command([DASHSCOPE_REQ], data), check=True)
    total = sum(p.stat().st_size for p in args.dest.rglob("*.whl"))
    print(
        f"{len(requirements) + 1} wheels in {args.dest} ({total / 2**20:.1f} MiB): {' '.join(requirements)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
