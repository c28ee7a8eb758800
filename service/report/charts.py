"""PNG charts of a benchmark and of the architecture report (matplotlib, Agg, no pyplot).

``matplotlib.figure.Figure`` with an explicit Agg canvas keeps no global state, so charts can
be drawn from any thread and never need a display.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from service.bench.inprocess import GOAL_CPU_RATIO, GOAL_LATENCY_MS
from service.bench.output import spin_label

DPI = 110
_MARKERS = "osD^vP*X"
_STYLES = ["-", "--", ":", "-."]


def _length_axes(ax: Any, cells: list[dict], ylabel: str) -> None:
    """Log-log axes over the text lengths that were measured, ticked at those lengths."""
    lengths = sorted({c["length"] for c in cells})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    plain_log_axis(ax.yaxis)
    ax.set_xticks(lengths, [str(length) for length in lengths])
    ax.set_xlabel("text length (tokens asked for)")
    ax.set_ylabel(ylabel)


def plain_log_axis(axis: Any) -> None:
    """Log-scale ticks as 2, 5, 10 rather than 2x10^0; minor ticks labelled at 2 and 5 only,
    so axes spanning several decades stay legible."""
    def minor(value: float, _: Any) -> str:
        leading = f"{value:.0e}"[0]
        return f"{value:g}" if leading in "25" else ""

    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def save_figure(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI, format="png")
    return path


def _spin_modes(cells: list[dict[str, Any]]) -> list[Any]:
    return sorted({c["spinning"] for c in cells}, key=lambda s: (s is True, s is None))


def _spin_title(spinning: Any) -> str:
    return {True: "ORT spinning on", False: "ORT spinning off"}.get(spinning, "server settings")


def _colors(models: list[str]) -> dict[str, str]:
    return {model: f"C{index % 10}" for index, model in enumerate(models)}


def _closed(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in cells if c["mode"] == "closed" and c["latency_ms"]["p50"] is not None]


def _panels(cells: list[dict[str, Any]], title: str,
            draw: Callable[[Any, list[dict[str, Any]], dict[str, str]], None]) -> Figure:
    modes = _spin_modes(cells)
    figure = Figure(figsize=(6.0 * len(modes), 4.4))
    colors = _colors(sorted({c["model"] for c in cells}))
    axes = figure.subplots(1, len(modes), squeeze=False)[0]
    for ax, mode in zip(axes, modes, strict=True):
        draw(ax, [c for c in cells if c["spinning"] == mode], colors)
        ax.set_title(f"{title} ({_spin_title(mode)})", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return figure


def _label(cell: dict[str, Any], with_per_request: bool) -> str:
    extra = f", {cell['texts_per_request']}/req" if with_per_request else ""
    name = cell["architecture"]
    # The model name only when it says more than the architecture does.
    if name not in cell["model"]:
        name = f"{name} ({cell['model']})"
    return f"{name}{extra}"


def latency_vs_length(cells: list[dict[str, Any]], path: Path) -> Path:
    closed = _closed(cells)
    several = len({c["texts_per_request"] for c in closed}) > 1

    def draw(ax: Any, subset: list[dict[str, Any]], colors: dict[str, str]) -> None:
        series = sorted({(c["model"], c["concurrency"], c["texts_per_request"]) for c in subset})
        callers = sorted({key[1] for key in series})
        for model, concurrency, per in series:
            points = sorted((c["length"], c) for c in subset if c["model"] == model
                            and c["concurrency"] == concurrency
                            and c["texts_per_request"] == per)
            xs = [length for length, _ in points]
            marker = _MARKERS[callers.index(concurrency) % len(_MARKERS)]
            name = f"{_label(points[0][1], several)} c={concurrency}"
            ax.plot(xs, [c["latency_ms"]["p50"] for _, c in points], color=colors[model],
                    marker=marker, linestyle="-", label=f"{name} p50")
            ax.plot(xs, [c["latency_ms"]["p99"] for _, c in points], color=colors[model],
                    marker=marker, linestyle="--", alpha=0.6, label=f"{name} p99")
        _length_axes(ax, subset, "latency (ms)")

    return save_figure(_panels(closed, "latency vs length", draw), path)


def throughput_vs_concurrency(cells: list[dict[str, Any]], path: Path) -> Path:
    closed = _closed(cells)

    def draw(ax: Any, subset: list[dict[str, Any]], colors: dict[str, str]) -> None:
        lengths = sorted({c["length"] for c in subset})
        for model in sorted({c["model"] for c in subset}):
            for length in lengths:
                for per in sorted({c["texts_per_request"] for c in subset}):
                    points = sorted((c["concurrency"], c) for c in subset
                                    if c["model"] == model and c["length"] == length
                                    and c["texts_per_request"] == per)
                    if not points:
                        continue
                    style = _STYLES[lengths.index(length) % len(_STYLES)]
                    ax.plot([x for x, _ in points], [c["texts_per_s"] for _, c in points],
                            color=colors[model], linestyle=style,
                            marker=_MARKERS[lengths.index(length) % len(_MARKERS)],
                            label=f"{points[0][1]['architecture']} len={length} {per}/req")
        callers = sorted({c["concurrency"] for c in subset})
        ax.set_xscale("log", base=2)
        ax.set_xticks(callers, [str(c) for c in callers])
        ax.set_xlabel("concurrent callers")
        ax.set_ylabel("texts/s")

    return save_figure(_panels(closed, "throughput vs concurrency", draw), path)


def throughput_vs_length(cells: list[dict[str, Any]], path: Path) -> Path:
    closed = [c for c in _closed(cells) if c["texts_per_request"] == 1] or _closed(cells)

    def draw(ax: Any, subset: list[dict[str, Any]], colors: dict[str, str]) -> None:
        callers = sorted({c["concurrency"] for c in subset})
        for model in sorted({c["model"] for c in subset}):
            for concurrency in callers:
                points = sorted((c["length"], c) for c in subset if c["model"] == model
                                and c["concurrency"] == concurrency)
                if points:
                    ax.plot([x for x, _ in points], [c["texts_per_s"] for _, c in points],
                            color=colors[model],
                            linestyle=_STYLES[callers.index(concurrency) % len(_STYLES)],
                            marker=_MARKERS[callers.index(concurrency) % len(_MARKERS)],
                            label=f"{points[0][1]['architecture']} c={concurrency}")
        _length_axes(ax, subset, "texts/s")

    return save_figure(_panels(closed, "throughput vs length", draw), path)


def latency_vs_rate(cells: list[dict[str, Any]], path: Path) -> Path | None:
    opened = [c for c in cells if c["mode"] == "open" and c["latency_ms"]["p50"] is not None]
    if not opened:
        return None

    def draw(ax: Any, subset: list[dict[str, Any]], colors: dict[str, str]) -> None:
        lengths = sorted({c["length"] for c in subset})
        for model in sorted({c["model"] for c in subset}):
            for length in lengths:
                points = sorted((c["rate"], c) for c in subset
                                if c["model"] == model and c["length"] == length)
                style = _STYLES[lengths.index(length) % len(_STYLES)]
                ax.plot([x for x, _ in points], [c["latency_ms"]["p99"] for _, c in points],
                        color=colors[model], linestyle=style, marker="o",
                        label=f"{points[0][1]['architecture']} len={length} p99")
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis)
        ax.set_xlabel("offered load (requests/s, Poisson)")
        ax.set_ylabel("latency from intended send (ms)")

    return save_figure(_panels(opened, "open loop", draw), path)


def bench_charts(document: dict[str, Any], out: Path) -> list[Path]:
    cells = document["cells"]
    paths = []
    if _closed(cells):
        paths += [latency_vs_length(cells, out / "latency_vs_length.png"),
                  throughput_vs_concurrency(cells, out / "throughput_vs_concurrency.png")]
    rate_chart = latency_vs_rate(cells, out / "latency_vs_rate.png")
    return paths + ([rate_chart] if rate_chart else [])


def accuracy_chart(models: list[dict[str, Any]], path: Path) -> Path:
    """Bars per model: accuracy in fp32, fp16 and int8, macro-F1, and agreement with fp32."""
    metrics = [("fp32 accuracy", "fp32_accuracy"), ("fp16 accuracy", "fp16_accuracy"),
               ("int8 accuracy", "int8_accuracy"), ("fp32 macro-F1", "fp32_macro_f1"),
               ("fp16 agreement", "fp16_agreement"), ("int8 agreement", "int8_agreement")]
    figure = Figure(figsize=(7.5, 4.2))
    ax = figure.subplots()
    width = 0.8 / max(len(models), 1)
    values = [m.get(key) for m in models for _, key in metrics if m.get(key) is not None]
    for index, model in enumerate(models):
        xs = [i + index * width for i in range(len(metrics))]
        ys = [model.get(key) or 0.0 for _, key in metrics]
        bars = ax.bar(xs, ys, width=width, label=f"{model['architecture']} ({model['name']})")
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(metrics))],
                  [name for name, _ in metrics], fontsize=8)
    ax.set_ylim(max(0.0, min(values, default=0.0) - 0.1), 1.02)
    ax.set_ylabel("fraction")
    ax.set_title("test-set quality from the manifests", fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(figure, path)


def overhead_chart(rows: list[dict[str, Any]], path: Path) -> Path | None:
    rows = [r for r in rows if r.get("cpu_ratio") is not None
            or r.get("latency_overhead_ms") is not None]
    if not rows:
        return None
    figure = Figure(figsize=(11.0, 4.2))
    left, right = figure.subplots(1, 2)
    labels = [f"{r['architecture']} {r['length']}\nspin {spin_label(r['spinning'])}"
              for r in rows]
    xs = list(range(len(rows)))
    left.bar(xs, [r.get("cpu_ratio") or 0.0 for r in rows], color="C0")
    left.axhline(GOAL_CPU_RATIO, color="C3", linestyle="--", label=f"goal {GOAL_CPU_RATIO}")
    left.set_title("(a) server / in-process texts per CPU-second", fontsize=10)
    # (b) split into the batcher's wait for company and everything else (gRPC, asyncio,
    # client), because the two call for different fixes.
    extra = [r.get("latency_overhead_ms") or 0.0 for r in rows]
    queue = [min(r.get("single_queue_p50_ms") or 0.0, e) for r, e in zip(rows, extra,
                                                                          strict=True)]
    right.bar(xs, queue, color="C2", label="waiting in the batcher (p50)")
    right.bar(xs, [e - q for e, q in zip(extra, queue, strict=True)], bottom=queue,
              color="C1", label="the rest")
    right.axhline(GOAL_LATENCY_MS, color="C3", linestyle="--", label=f"goal {GOAL_LATENCY_MS} ms")
    right.set_title("(b) one caller's p50 minus in-process batch 1 (ms)", fontsize=10)
    for ax in (left, right):
        ax.set_xticks(xs, labels, fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(figure, path)
