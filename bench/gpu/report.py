"""The GPU check's figures and their markdown report (pure: no torch, no I/O but ``write``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(slots=True)
class DecodeRow:
    """One decode level: ``batch`` greedy text streams in one batch, ``tokens`` in ``seconds``."""

    batch: int
    tokens: int
    seconds: float
    bound_tok_s: float | None = None  # bound.decode_bound for this batch (None: not measured)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def of_bound(self) -> float | None:
        return self.tok_s / self.bound_tok_s if self.bound_tok_s else None


@dataclass(slots=True)
class TargetRow:
    """One path (raw engine, model service HTTP, api) at one concurrency."""

    target: str
    concurrency: int
    requests: int
    ok: int
    tok_s: float
    ttft_p50_s: float | None
    vs_raw: float | None = None  # tok_s / the raw engine's tok_s at the same concurrency


@dataclass(slots=True)
class TtftRow:
    """Time to first token of one 1024x1024 image request along one path (median of ``runs``)."""

    path: str
    seconds: float
    runs: int
    prompt_tokens: int = 0


@dataclass(slots=True)
class MediaCheck:
    """One request of one kind (text, image, video) and what came back."""

    kind: str
    via: str
    ok: bool
    tokens: int = 0
    seconds: float = 0.0
    detail: str = ""


@dataclass(slots=True)
class GpuReport:
    """Everything the check measured; sections not reached stay empty (see ``failures``)."""

    mode: str  # "cuda" or "cpu dry run"
    device: str = ""
    dtype: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    parameters: int = 0
    total_bytes: int = 0
    decode_bytes: int = 0
    bandwidth: float | None = None  # bytes/s, read + written
    decode: list[DecodeRow] = field(default_factory=list)
    targets: list[TargetRow] = field(default_factory=list)
    ttft: list[TtftRow] = field(default_factory=list)
    media: list[MediaCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # "phase: reason"
    started: str = ""
    duration_s: float = 0.0


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.0f}%"


def _table(head: list[str], rows: list[list[str]]) -> str:
    align = ["---"] + ["---:"] * (len(head) - 1)
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def _header(r: GpuReport) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in r.versions.items())
    lines = [
        f"Run: {r.started}, {r.mode} on {r.device or '?'} ({r.dtype}; {versions}); {r.duration_s:.0f} s."
    ]
    if r.parameters:
        lines.append(
            f"Model: {r.parameters / 1e9:.3f} B parameters, {_size(r.total_bytes)}; one decode step "
            f"reads the decoder's {_size(r.decode_bytes)}."
        )
    if r.bandwidth and r.decode_bytes:
        step = r.decode_bytes / r.bandwidth
        lines.append(
            f"Measured copy bandwidth {r.bandwidth / 1e9:.0f} GB/s (read + written): a decode step takes "
            f"at least {step * 1000:.2f} ms, at most {1 / step:.0f} steps/s."
        )
    return lines


def _sections(r: GpuReport) -> list[str]:
    parts: list[str] = []
    if r.decode:
        rows = [
            [
                str(d.batch),
                str(d.tokens),
                f"{d.seconds:.2f}",
                f"{d.tok_s:.1f}",
                _num(d.bound_tok_s),
                _pct(d.of_bound),
            ]
            for d in r.decode
        ]
        head = ["batch", "tokens", "seconds", "tok/s", "bound tok/s", "of bound"]
        parts += ["### Decode tokens/s vs the weight-read bound", "", _table(head, rows)]
    if r.targets:
        rows = [
            [
                t.target,
                str(t.concurrency),
                f"{t.ok}/{t.requests}",
                f"{t.tok_s:.1f}",
                _ms(t.ttft_p50_s),
                _num(t.vs_raw, 2),
            ]
            for t in r.targets
        ]
        head = ["path", "streams", "ok", "tok/s", "TTFT p50 ms", "vs raw"]
        parts += ["### HTTP paths vs the in-process engine", "", _table(head, rows)]
    if r.ttft:
        rows = [[t.path, str(t.prompt_tokens), str(t.runs), _ms(t.seconds)] for t in r.ttft]
        parts += [
            "### TTFT of a 1024x1024 image",
            "",
            _table(["path", "prompt tokens", "runs", "TTFT ms (median)"], rows),
        ]
    if r.media:
        rows = [
            [m.kind, m.via, "yes" if m.ok else "**no**", str(m.tokens), f"{m.seconds:.2f}", m.detail]
            for m in r.media
        ]
        parts += ["### Requests", "", _table(["kind", "via", "ok", "tokens", "seconds", "detail"], rows)]
    return parts


def _num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render_markdown(r: GpuReport) -> str:
    """The report as markdown: a header, one table per measured section, notes and failures."""
    parts = ["## GPU check (`make gpu-check`)", "", *_header(r), "", *_sections(r)]
    if r.notes:
        parts += ["### Notes", "", *[f"- {n}" for n in r.notes], ""]
    if r.failures:
        parts += ["### Failures", "", *[f"- {f}" for f in r.failures], ""]
    return "\n".join(parts).rstrip() + "\n"


def write(r: GpuReport, path: Path) -> None:
    """Write ``render_markdown(r)`` to ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_markdown(r))
