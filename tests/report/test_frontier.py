"""The accuracy-cost frontier from hand-made numbers: points, the Pareto front, the words."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.cli import is_png

from service.report.frontier import (
    distillation_claims,
    front,
    frontier_chart,
    frontier_claims,
    frontier_points,
    frontier_section,
)
from service.report.markdown import best_fp32_reference


def _cell(model: str, arch: str, precision: str, length: int, cpu_ms: float,
          callers: int = 32) -> dict[str, Any]:
    return {"model": model, "architecture": arch, "precision": precision, "length": length,
            "concurrency": callers, "mode": "closed", "texts_per_request": 1,
            "texts_per_server_cpu_s": 1000.0 / cpu_ms, "texts_per_s": 500.0 / cpu_ms}


QUALITY = [
    {"name": "lstm", "fp32_accuracy": 0.76, "fp16_accuracy": 0.76, "int8_accuracy": None},
    {"name": "tr", "fp32_accuracy": 0.75, "fp16_accuracy": 0.75, "int8_accuracy": 0.749},
    {"name": "big", "fp32_accuracy": 0.84, "fp16_accuracy": 0.84, "int8_accuracy": 0.842},
]


def _document() -> dict[str, Any]:
    primary = [_cell("lstm", "lstm", "fp32", 16, 1.0), _cell("lstm", "lstm", "fp32", 256, 3.6),
               _cell("tr", "transformer", "int8", 16, 1.2),
               _cell("tr", "transformer", "int8", 256, 8.0),
               _cell("big", "pretrained", "int8", 16, 6.0),
               _cell("big", "pretrained", "int8", 256, 50.0),
               # one caller: not a frontier cell
               _cell("big", "pretrained", "int8", 256, 20.0, callers=1)]
    others = [_cell("tr", "transformer", "fp32", 16, 1.1),
              _cell("tr", "transformer", "fp32", 256, 8.1),
              _cell("big", "pretrained", "fp32", 16, 9.7),
              _cell("big", "pretrained", "fp32", 256, 91.0),
              # a second cell for a point the primary run already has: the primary's wins
              _cell("lstm", "lstm", "fp32", 256, 99.0)]
    return {"cells": primary, "precision_cells": others}


def test_points_cost_and_pareto_front() -> None:
    points = frontier_points(_document(), QUALITY)
    by_key = {(p.model, p.precision): p for p in points}
    assert set(by_key) == {("lstm", "fp32"), ("tr", "int8"), ("tr", "fp32"), ("big", "int8"),
                           ("big", "fp32")}
    assert by_key[("lstm", "fp32")].cpu_ms == {16: 1.0, 256: 3.6}
    assert by_key[("big", "int8")].cpu_ms[256] == 50.0  # the 32-caller cell, not 1 caller
    # The LSTM is cheaper and more accurate than the small Transformer: the Transformer is
    # dominated; MiniLM int8 beats its fp32 on both axes.
    assert [p.model + " " + p.precision for p in front(points, 256)] == ["lstm fp32",
                                                                        "big int8"]
    assert not by_key[("big", "fp32")].pareto[256] and not by_key[("tr", "int8")].pareto[16]


def test_claims_section_and_chart(tmp_path: Path) -> None:
    points = frontier_points(_document(), QUALITY)
    claims = frontier_claims(points, [16, 256])
    expected = ("At 256 tokens the Pareto front runs from lstm fp32 (0.760, 3.60 CPU-ms per "
                "text) to pretrained int8 (0.842, 50.00): pretrained int8 buys +8.2 points "
                "for 13.9x the CPU of lstm fp32.")
    assert expected in claims
    assert any(claim.startswith("pretrained int8 costs 0.55x the CPU per text of its fp32 at "
                                "256 tokens for +0.20 points") for claim in claims)
    section = "\n".join(frontier_section(points, [16, 256]))
    assert "| pretrained (big) | int8 | 0.8420 | 6.00 |" in section
    assert is_png(frontier_chart(points, [16, 256], tmp_path / "frontier.png"))


def test_served_defaults_against_fp32_at_its_best_thread_count() -> None:
    rows = [{"model": "big", "length": 256, "threads": threads, "batch_size": 8,
             "texts_per_s": rate, "served_texts_per_s": 36.0}
            for threads, rate in ((1, 11.0), (2, 20.0))]
    [best] = best_fp32_reference({"fp32_reference": rows})
    assert (best["threads"], best["fp32_texts_per_s"]) == (2, 20.0)
    assert best["ratio"] == 36.0 / 20.0


def test_a_distilled_model_is_its_own_point_and_claims_what_it_kept() -> None:
    quality = [*QUALITY, {"name": "pupil", "architecture": "lstm", "fp32_accuracy": 0.82,
                          "teacher": "big", "teacher_test_accuracy": 0.84}]
    quality[0] = {**quality[0], "architecture": "lstm"}
    document = _document()
    document["cells"] += [_cell("pupil", "lstm", "fp32", 16, 1.0),
                          _cell("pupil", "lstm", "fp32", 256, 4.0)]
    points = frontier_points(document, quality)
    pupil = next(p for p in points if p.model == "pupil")
    assert pupil.label == "lstm distilled fp32" and pupil.teacher == "big"
    # Nearly as cheap as the LSTM and more accurate: on the front at both lengths, and the
    # plain LSTM stays on it only where it is cheaper.
    assert pupil.pareto == {16: True, 256: True}
    claims = distillation_claims(points, quality, [16, 256])
    assert claims == [
        "The lstm distilled from big scores 0.820 against 0.760 from scratch and 0.840 for its "
        "teacher: it keeps +6.0 of the +8.0 points pretraining bought, at 6.0x less CPU per "
        "text than the teacher's int8 at 16 tokens and 12.5x less CPU per text than the "
        "teacher's int8 at 256 tokens."]
    section = "\n".join(frontier_section(points, [16, 256]))
    assert "| lstm (pupil, distilled from big) | fp32 | 0.8200 |" in section
