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
class KvLayoutRow:
    """One KV layout at ``rows`` rows (``bench.kv_bench.measure_churn``): mean ms per decode step, steady and
    with one leave + one join every ``churn_every`` steps (amortised), each the best of ``runs`` runs of
    ``steps`` steps."""

    layout: str  # "concat" | "slots" | "slots-static"
    setting: str  # the settings that select it, e.g. "KV_LAYOUT=slots + KV_STATIC_SHAPES=true"
    rows: int
    steps: int
    runs: int
    churn_every: int
    steady_ms: float
    join_heavy_ms: float

    @property
    def ratio(self) -> float:
        """Join-heavy over steady ms/step (1.0: joins and leaves cost nothing)."""
        return self.join_heavy_ms / self.steady_ms if self.steady_ms > 0 else 0.0


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
    kv_layouts: list[KvLayoutRow] = field(default_factory=list)
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
    if r.kv_layouts:
        parts += _kv_section(r.kv_layouts)
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


KV_CAPTION = (
    "Mean ms per decode step of the engine's batch functions (logits only, no sampling), steady vs with one "
    "row leaving and a prefilled one joining every {every} steps (the joiner's prefill off the clock; CUDA "
    "synchronised before every clock read); each the best of its runs. ratio = join-heavy / steady."
)
NO_CLEAR_WINNER = 0.03  # a layout within 3% of the best is not told apart from it


def _kv_section(rows: list[KvLayoutRow]) -> list[str]:
    """The KV layouts table and, per row count, which layout was fastest under churn and when steady."""
    table = [
        [
            str(k.rows),
            k.setting,
            f"{k.steps} x {k.runs}",
            f"{k.steady_ms:.2f}",
            f"{k.join_heavy_ms:.2f}",
            f"{k.ratio:.2f}",
        ]
        for k in rows
    ]
    head = ["rows", "layout", "steps x runs", "steady ms/step", "join-heavy ms/step", "ratio"]
    lines = ["### KV layouts under churn", "", KV_CAPTION.format(every=rows[0].churn_every), ""]
    lines += [_table(head, table)]
    for count in dict.fromkeys(k.rows for k in rows):
        level = [k for k in rows if k.rows == count]
        lines.append(
            f"- @{count} rows: under churn {_fastest(level, 'join_heavy_ms')}; "
            f"on the steady decode {_fastest(level, 'steady_ms')}."
        )
    return [*lines, ""]


def _fastest(level: list[KvLayoutRow], key: str) -> str:
    """``"<setting> was fastest (x ms/step, r x concat's)"``, or that no layout was clearly faster."""
    ranked = sorted(level, key=lambda k: getattr(k, key))
    best, ms = ranked[0], getattr(ranked[0], key)
    concat = next((getattr(k, key) for k in level if k.layout == "concat"), None)
    versus = f", {ms / concat:.2f}x concat's" if concat and best.layout != "concat" else ""
    text = f"{best.setting} was fastest ({ms:.2f} ms/step{versus})"
    if len(ranked) > 1 and getattr(ranked[1], key) <= ms * (1 + NO_CLEAR_WINNER):
        text += f", within {NO_CLEAR_WINNER:.0%} of {ranked[1].setting}: no clear winner"
    return text


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
