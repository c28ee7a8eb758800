"""The accuracy-cost frontier: every model x precision as one point, test accuracy against the
server CPU one text costs, with the Pareto front marked.

A point's cost is server CPU-milliseconds per text in the closed-loop cell with the most
callers (32 by default) at the shortest and the longest length benchmarked: what a busy
replica pays, batching included, read from /proc for the server process. Its accuracy is the
manifest's test accuracy for that precision. A point is on the front when no other point is
at least as accurate for no more CPU (and better in one of the two).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from service.report.charts import plain_log_axis, save_figure


@dataclass
class Point:
    model: str
    architecture: str
    precision: str
    accuracy: float
    cpu_ms: dict[int, float]  # length -> server CPU-ms per text
    texts_per_s: dict[int, float]  # length -> texts/s in that cell
    pareto: dict[int, bool] = field(default_factory=dict)
    teacher: str | None = None  # the teacher's model name, for a distilled model

    @property
    def label(self) -> str:
        distilled = " distilled" if self.teacher else ""
        return f"{self.architecture}{distilled} {self.precision}"


def frontier_lengths(cells: list[dict[str, Any]]) -> list[int]:
    lengths = sorted({c["length"] for c in cells})
    return [lengths[0], lengths[-1]] if len(lengths) > 1 else lengths


def _busy_cells(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    closed = [c for c in cells if c["mode"] == "closed" and c["texts_per_request"] == 1
              and c.get("texts_per_server_cpu_s")]
    most = max((c["concurrency"] or 0 for c in closed), default=0)
    return [c for c in closed if c["concurrency"] == most and most > 1]


def frontier_points(document: dict[str, Any], quality: list[dict[str, Any]]) -> list[Point]:
    """One point per (model, served precision) found in the bench, primary run first."""
    cells = _busy_cells([*document["cells"], *document.get("precision_cells", [])])
    lengths = frontier_lengths(cells)
    accuracy = {q["name"]: q for q in quality}
    points: dict[tuple[str, str], Point] = {}
    for cell in cells:
        if cell["length"] not in lengths or cell["model"] not in accuracy:
            continue
        key = (cell["model"], cell["precision"])
        figure = accuracy[cell["model"]].get(f"{cell['precision']}_accuracy")
        if figure is None:
            continue
        point = points.setdefault(key, Point(cell["model"], cell["architecture"],
                                             cell["precision"], figure, {}, {},
                                             teacher=accuracy[cell["model"]].get("teacher")))
        # The first cell seen for a (model, precision, length) wins: the primary run's.
        point.cpu_ms.setdefault(cell["length"], 1000.0 / cell["texts_per_server_cpu_s"])
        point.texts_per_s.setdefault(cell["length"], cell["texts_per_s"])
    found = list(points.values())
    for length in lengths:
        mark_pareto(found, length)
    return found


def mark_pareto(points: list[Point], length: int) -> None:
    for point in points:
        if length not in point.cpu_ms:
            continue
        point.pareto[length] = not any(
            other is not point and length in other.cpu_ms
            and other.accuracy >= point.accuracy and other.cpu_ms[length] <= point.cpu_ms[length]
            and (other.accuracy > point.accuracy or other.cpu_ms[length] < point.cpu_ms[length])
            for other in points)


def front(points: list[Point], length: int) -> list[Point]:
    """The Pareto front at ``length``, cheapest first."""
    return sorted((p for p in points if p.pareto.get(length)), key=lambda p: p.cpu_ms[length])


def frontier_chart(points: list[Point], lengths: list[int], path: Path) -> Path | None:
    if not points or not lengths:
        return None
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.2 * len(lengths), 4.2))
    axes = figure.subplots(1, len(lengths), squeeze=False)[0]
    for ax, length in zip(axes, lengths, strict=True):
        shown = sorted((p for p in points if length in p.cpu_ms),
                       key=lambda p: (p.accuracy, p.cpu_ms[length]))
        for index, point in enumerate(shown):
            on_front = point.pareto.get(length, False)
            ax.scatter(point.cpu_ms[length], point.accuracy, s=60 if on_front else 30,
                       marker="o" if on_front else "x", color="C3" if on_front else "C0",
                       zorder=3)
            # Neighbours in accuracy alternate above and below, so close points stay legible.
            ax.annotate(point.label, (point.cpu_ms[length], point.accuracy), fontsize=8,
                        xytext=(5, 5 if index % 2 else -11), textcoords="offset points")
        line = front(shown, length)
        ax.plot([p.cpu_ms[length] for p in line], [p.accuracy for p in line], color="C3",
                linewidth=1, drawstyle="steps-post", zorder=2)
        ax.set_xscale("log")
        plain_log_axis(ax.xaxis)
        ax.margins(x=0.15, y=0.08)
        ax.set_xlabel(f"server CPU-ms per text, {length} tokens (log)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{length} tokens: Pareto front in red")
        ax.grid(True, which="both", alpha=0.3)
    return save_figure(figure, path)


def frontier_section(points: list[Point], lengths: list[int]) -> list[str]:
    from service.bench.output import fmt

    if not points:
        return []
    headers = ["model", "precision", "test accuracy"]
    for length in lengths:
        headers += [f"CPU-ms/text {length} tok", f"texts/s {length} tok", f"front {length}"]
    rows = []
    for point in sorted(points, key=lambda p: (-p.accuracy, p.model, p.precision)):
        distilled = f", distilled from {point.teacher}" if point.teacher else ""
        row = [f"{point.architecture} ({point.model}{distilled})", point.precision,
               fmt(point.accuracy, 4)]
        for length in lengths:
            row += [fmt(point.cpu_ms.get(length), 2), fmt(point.texts_per_s.get(length), 0),
                    "yes" if point.pareto.get(length) else ""]
        rows.append(row)
    table = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
             *("| " + " | ".join(r) + " |" for r in rows), ""]
    return ["## The accuracy-cost frontier", "",
            "Every model and precision served in the bench: test accuracy (manifest) against "
            "the server's CPU per text at the most callers; on the front when nothing else is "
            "as accurate for less CPU.", "", *table, "![frontier](frontier.png)", ""]


def frontier_claims(points: list[Point], lengths: list[int]) -> list[str]:
    """Sentences worded from the front: what each step up in accuracy costs."""
    claims = []
    for length in lengths:
        line = front(points, length)
        if len(line) < 2:
            if line:
                claims.append(f"At {length} tokens one point dominates every other: "
                              f"{line[0].label} ({line[0].accuracy:.3f}, "
                              f"{line[0].cpu_ms[length]:.2f} CPU-ms per text).")
            continue
        cheapest, best = line[0], line[-1]
        steps = "; ".join(
            f"{b.label} buys {(b.accuracy - a.accuracy) * 100:+.1f} points for "
            f"{b.cpu_ms[length] / a.cpu_ms[length]:.1f}x the CPU of {a.label}"
            for a, b in pairwise(line))
        claims.append(f"At {length} tokens the Pareto front runs from {cheapest.label} "
                      f"({cheapest.accuracy:.3f}, {cheapest.cpu_ms[length]:.2f} CPU-ms per text) "
                      f"to {best.label} ({best.accuracy:.3f}, {best.cpu_ms[length]:.2f}): "
                      f"{steps}.")
    for point in points:
        twin = next((p for p in points if p.model == point.model and p.precision == "fp32"
                     and point.precision == "int8"), None)
        if twin is not None and lengths and lengths[-1] in twin.cpu_ms \
                and lengths[-1] in point.cpu_ms:
            length = lengths[-1]
            claims.append(
                f"{point.architecture} int8 costs {point.cpu_ms[length] / twin.cpu_ms[length]:.2f}"
                f"x the CPU per text of its fp32 at {length} tokens for "
                f"{(point.accuracy - twin.accuracy) * 100:+.2f} points of accuracy.")
    return claims


def distillation_claims(points: list[Point], quality: list[dict[str, Any]],
                        lengths: list[int]) -> list[str]:
    """For each distilled model: how many of the points its teacher's pretraining bought over
    the same architecture trained from scratch it keeps, and at what fraction of the
    teacher's CPU per text (each served at its benchmarked precision)."""
    claims = []
    by_name = {q["name"]: q for q in quality}
    for student in (q for q in quality if q.get("teacher") and q.get("fp32_accuracy")):
        teacher = by_name.get(student["teacher"])
        teacher_accuracy = (teacher or {}).get("fp32_accuracy") or student.get(
            "teacher_test_accuracy")
        scratch = next((q for q in quality if q["architecture"] == student["architecture"]
                        and not q.get("teacher") and q.get("fp32_accuracy") is not None), None)
        if teacher_accuracy is None or scratch is None:
            continue
        bought = (teacher_accuracy - scratch["fp32_accuracy"]) * 100
        kept = (student["fp32_accuracy"] - scratch["fp32_accuracy"]) * 100
        sentence = (f"The {student['architecture']} distilled from {student['teacher']} "
                    f"scores {student['fp32_accuracy']:.3f} against {scratch['fp32_accuracy']:.3f}"
                    f" from scratch and {teacher_accuracy:.3f} for its teacher: it keeps "
                    f"{kept:+.1f} of the {bought:+.1f} points pretraining bought")
        costs = []
        mine = [p for p in points if p.model == student["name"]]
        theirs = [p for p in points if p.model == student["teacher"]]
        for length in lengths:
            cheapest = min((p for p in mine if length in p.cpu_ms),
                           key=lambda p: p.cpu_ms[length], default=None)
            rival = min((p for p in theirs if length in p.cpu_ms),
                        key=lambda p: p.cpu_ms[length], default=None)
            if cheapest is not None and rival is not None:
                costs.append(f"{rival.cpu_ms[length] / cheapest.cpu_ms[length]:.1f}x less CPU "
                             f"per text than the teacher's {rival.precision} at {length} tokens")
        claims.append(sentence + (", at " + " and ".join(costs) if costs else "") + ".")
    return claims
