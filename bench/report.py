"""Turn level results into the targets' ratios, a text table, results.json, bench.png and README.md."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.loadgen import LevelResult

RAW = "raw engine"
MODEL_MAX_IMAGE_TOKENS = 16384  # Qwen3-VL's own per-image maximum (its processor's longest_edge / 32x32)
GPU_SECTION = "## GPU check"  # kept from the previous README.md: it comes from `make gpu-check` on a GPU
STACK = "full stack"
TFS = "transformers serve"


@dataclass(slots=True)
class Ratio:
    name: str
    value: float | None
    target: str  # e.g. ">= 0.85"
    status: str  # PASS | MISS | n/a
    detail: str


def _find(results: Sequence[LevelResult], target: str, concurrency: int) -> LevelResult | None:
    for r in results:
        if r.target == target and r.concurrency == concurrency and r.ok:
            return r
    return None


def _ratio(
    name: str, num: float | None, den: float | None, bound: float, at_least: bool, detail: str
) -> Ratio:
    target = f"{'>=' if at_least else '<='} {bound:.2f}".rstrip("0").rstrip(".")
    if num is None or den is None or den == 0:
        return Ratio(name, None, target, "n/a", detail + " (not measured)")
    value = num / den
    ok = value >= bound if at_least else value <= bound
    return Ratio(name, value, target, "PASS" if ok else "MISS", detail)


def compute_ratios(results: Sequence[LevelResult]) -> list[Ratio]:
    def tok(target: str, c: int) -> float | None:
        r = _find(results, target, c)
        return r.tok_s if r else None

    ours16, tfs16 = _find(results, STACK, 16), _find(results, TFS, 16)
    return [
        _ratio(
            "stack single / raw single (tok/s)",
            tok(STACK, 1),
            tok(RAW, 1),
            0.85,
            True,
            "full stack (nginx->api->model), 1 stream vs the in-process engine, 1 stream",
        ),
        _ratio(
            "stack @16 / raw @16 (tok/s)",
            tok(STACK, 16),
            tok(RAW, 16),
            0.85,  # issue #14 (was 0.8 in #6)
            True,
            "16 concurrent streams through the edge vs 16 in-process",
        ),
        _ratio(
            "stack @16 / stack single (tok/s)",
            tok(STACK, 16),
            tok(STACK, 1),
            4.0,
            True,
            "batching gain of the full stack",
        ),
        _ratio(
            "ours @16 / transformers serve @16 (tok/s)",
            tok(STACK, 16),
            tok(TFS, 16),
            5.0,
            True,
            "aggregate tokens/s, same workload",
        ),
        _ratio(
            "ours p99 e2e @16 / transformers serve p99 e2e @16",
            ours16.e2e_p99 if ours16 else None,
            tfs16.e2e_p99 if tfs16 else None,
            1 / 3,
            False,
            "end-to-end latency, 99th percentile",
        ),
    ]


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def _runs(r: LevelResult) -> str:
    """Every run's tok/s when the level was repeated (the row shows the best one)."""
    if len(r.tok_s_runs) < 2:
        return ""
    return " (" + ", ".join(f"{x:.0f}" for x in r.tok_s_runs) + ")"


def _steps(r: LevelResult) -> str:
    """The engine's mean step time and rows per step in the level (``-`` where they cannot be read)."""
    if r.engine_step_ms is None or r.engine_rows is None:
        return "-"
    return f"{r.engine_step_ms:.2f} / {r.engine_rows:.1f}"


def level_table(results: Sequence[LevelResult]) -> str:
    head = (
        "| target | conc | req | ok | tok/s | TTFT p50/p99 ms | ITL p50/p99 ms | e2e p50/p99 ms | "
        "engine ms/step / rows | wall s |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = [
        f"| {r.target} | {r.concurrency} | {r.requests} | {r.ok} | {r.tok_s:.1f}{_runs(r)} | "
        f"{_ms(r.ttft_p50)} / {_ms(r.ttft_p99)} | {_ms(r.itl_p50)} / {_ms(r.itl_p99)} | "
        f"{_ms(r.e2e_p50)} / {_ms(r.e2e_p99)} | {_steps(r)} | {r.wall_s:.1f} |"
        for r in results
    ]
    return head + "\n".join(rows) + "\n"


def cpu_table(results: Sequence[LevelResult]) -> str:
    """CPU milliseconds per generated token, by process tree, and how busy the cores were."""
    head = "| target | conc | wall ms/token | CPU ms/token by process | cores busy |\n"
    head += "|---|---:|---:|---|---:|\n"
    rows = []
    for r in results:
        if not r.cpu_s or not r.completion_tokens or not r.wall_s:
            continue
        per = ", ".join(f"{name} {sec * 1000 / r.completion_tokens:.2f}" for name, sec in r.cpu_s.items())
        busy = sum(r.cpu_s.values()) / r.wall_s
        wall = r.wall_s * 1000 / r.completion_tokens
        rows.append(f"| {r.target} | {r.concurrency} | {wall:.2f} | {per} | {busy:.2f} |")
    return head + "\n".join(rows) + "\n" if rows else ""


def ratio_table(ratios: Sequence[Ratio]) -> str:
    head = "| ratio | value | target | result |\n|---|---:|---:|---|\n"
    rows = [
        f"| {r.name} | {'-' if r.value is None else f'{r.value:.3f}'} | {r.target} | **{r.status}** |"
        for r in ratios
    ]
    return head + "\n".join(rows) + "\n"


def error_lines(results: Sequence[LevelResult]) -> list[str]:
    return [
        f"- {r.target} @{r.concurrency}: {r.errors} failed: {'; '.join(r.error_samples)}"
        for r in results
        if r.errors
    ]


def stall_table(rows: Sequence[dict[str, Any]], default_cap: int) -> str:
    """(f) One row per MAX_IMAGE_TOKENS value: the image's visual tokens, its preparation (off the scheduler),
    the running stream's worst gap and the image's own first token, all in seconds."""
    head = (
        "(f) a running stream while a 4095x4095 image is prefilled (in-process engine)\n"
        "| MAX_IMAGE_TOKENS | visual tokens | prepare s | worst stream gap s | image first token s |\n"
        "|---|---:|---:|---:|---:|\n"
    )
    names = {default_cap: f"{default_cap} (service default)", MODEL_MAX_IMAGE_TOKENS: "16384 (model's own)"}
    body = [
        f"| {names.get(r['max_image_tokens'], r['max_image_tokens'])} | {r['image_tokens']} | "
        f"{r['prepare_seconds']:.2f} | {r['worst_gap_seconds']:.2f} | {r['image_first_token_seconds']:.2f} |"
        for r in rows
    ]
    return head + "\n".join(body) + "\n"


def keep_gpu_section(new: str, old: str) -> str:
    """``new`` README text plus the GPU-check section (to the end) of the ``old`` one, if it had one: a CPU
    run of ``make bench`` must not erase the table a GPU run committed."""
    start = old.find("\n" + GPU_SECTION)
    if start < 0:
        return new
    return new.rstrip("\n") + "\n\n" + old[start + 1 :]


def render_markdown(meta: dict[str, Any], results: Sequence[LevelResult], ratios: Sequence[Ratio]) -> str:
    notes = [f"- {n}" for n in meta.get("notes", [])]
    config = ", ".join(f"{k}={v}" for k, v in meta.get("config", {}).items())
    parts = [
        "# Benchmark results",
        "",
        "Written by `python -m bench` (`make bench`); the JSON and the plot beside it are git-ignored.",
        "Tokens are completion tokens reported by each server's usage; ITL is per request "
        "(end - first token) / (tokens - 1); TTFT is the first chunk with text. p99 over few requests is "
        "close to the maximum. Repeated levels list every run's tok/s in brackets; the row is the best run.",
        "",
        f"Run: {meta.get('started', '?')} on {meta.get('machine', '?')} ({config}); "
        f"1-minute load average before/after: {meta.get('load_avg_1m', '?')}.",
        "",
        "## Targets",
        "",
        ratio_table(ratios),
        "## Levels",
        "",
        level_table(results),
        "![tokens/s and TTFT vs concurrency](bench.png)",
        "",
    ]
    cpu = cpu_table(results)
    if cpu:
        parts += [
            "## Where the CPU goes",
            "",
            "CPU time of each process tree during the level, per generated token (the bench process is the "
            "load client, and the raw engine too); `cores busy` = all of it / wall time (2 cores here).",
            "",
            cpu,
        ]
    if notes:
        parts += ["## Notes", "", *notes, ""]
    errors = error_lines(results)
    if errors:
        parts += ["## Errors", "", *errors, ""]
    return "\n".join(parts)


def plot(results: Sequence[LevelResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tok, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for target, style in ((STACK, "o-"), (TFS, "s--"), (RAW, "^:")):
        pts = sorted((r.concurrency, r) for r in results if r.target == target and r.ok)
        if not pts:
            continue
        xs = [c for c, _ in pts]
        ax_tok.plot(xs, [r.tok_s for _, r in pts], style, label=target)
        ax_ttft.plot(xs, [(r.ttft_p50 or 0) * 1000 for _, r in pts], style, label=f"{target} p50")
    panels = ((ax_tok, "aggregate throughput", "tokens/s"), (ax_ttft, "time to first token", "ms"))
    for ax, title, unit in panels:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_ttft.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(
    out_dir: Path, meta: dict[str, Any], results: Sequence[LevelResult], ratios: Sequence[Ratio]
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "meta": meta,
        "levels": [r.as_dict() for r in results],
        "ratios": [asdict(r) for r in ratios],
    }
    (out_dir / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    plot(results, out_dir / "bench.png")
    readme = out_dir / "README.md"
    old = readme.read_text() if readme.exists() else ""
    readme.write_text(keep_gpu_section(render_markdown(meta, results, ratios), old))
