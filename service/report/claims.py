"""What a benchmark says about the talk's claims, worded from the numbers (nothing hard-coded).

"LSTM is dead. Long Live Transformers!" argues that Transformers beat LSTMs on quality and, by
processing all positions in parallel rather than one step at a time, on speed, increasingly so
for long sequences. Each statement below names the figure it rests on; differences within
``TIE`` are called ties, because run-to-run noise on a shared CPU is of that order.
"""

from __future__ import annotations

import math
from typing import Any

from service.bench.inprocess import GOAL_CPU_RATIO, GOAL_LATENCY_MS
from service.bench.output import busy_machine, fmt, spin_label

TIE = 0.05  # relative difference below which two timings are called equal
P99_REQUESTS = 1000  # below this many requests a p99 rests on fewer than 10 samples


def primary_spinning(cells: list[dict[str, Any]]) -> Any:
    """The mode the headline comparisons use: spinning off (the server default) when present."""
    modes = [c["spinning"] for c in cells]
    return False if False in modes else (modes[0] if modes else None)


def one_text_cells(cells: list[dict[str, Any]], spinning: Any) -> list[dict[str, Any]]:
    return [c for c in cells if c["spinning"] == spinning and c["mode"] == "closed"
            and c["texts_per_request"] == 1 and c["latency_ms"]["p50"] is not None]


def busiest(cells: list[dict[str, Any]]) -> int | None:
    return max((c["concurrency"] for c in cells), default=None)


def _pick(cells: list[dict[str, Any]], model: str, length: int, concurrency: int
          ) -> dict[str, Any] | None:
    return next((c for c in cells if c["model"] == model and c["length"] == length
                 and c["concurrency"] == concurrency), None)


def _names(cells: list[dict[str, Any]]) -> dict[str, str]:
    """Model name -> how sentences call it (the architecture, unless two models share one)."""
    archs: dict[str, str] = {c["model"]: c["architecture"] for c in cells}
    counts = {a: list(archs.values()).count(a) for a in archs.values()}
    return {m: (a if counts[a] == 1 else f"{a} ({m})") for m, a in archs.items()}


def _served_tokens(cells: list[dict[str, Any]], length: int) -> str:
    tokens = [c["tokens_mean"] for c in cells if c["length"] == length and c["tokens_mean"]]
    served = round(min(tokens)) if tokens else length
    return f"{length} tokens" if served >= length else f"{length} tokens (served as {served})"


def compare(values: dict[str, float], names: dict[str, str], lower_is_better: bool,
            unit: str, digits: int = 2) -> tuple[str, str | None]:
    """(``lstm 1.2 ms vs transformer 1.8 ms: lstm is 1.50x faster``, winner or None on a tie)."""
    ranked = sorted(values.items(), key=lambda kv: kv[1], reverse=not lower_is_better)
    listing = " vs ".join(f"{names[m]} {v:,.{digits}f}{unit}" for m, v in values.items())
    (best, a), (_, b) = ranked[0], ranked[1]
    if a <= 0 or b <= 0 or abs(a - b) / max(a, b) < TIE:
        return f"{listing}: a tie (within {TIE:.0%})", None
    factor = b / a if lower_is_better else a / b
    word = "faster" if lower_is_better else "more"
    return f"{listing}: **{names[best]}** is {factor:.2f}x {word}", names[best]


def speed_claims(cells: list[dict[str, Any]], spinning: Any) -> list[str]:
    subset = one_text_cells(cells, spinning)
    models = sorted({c["model"] for c in subset})
    if len(models) < 2:
        return ["Only one model was measured, so there is no architecture comparison."]
    names = _names(subset)
    lengths = sorted({c["length"] for c in subset})
    views: list[tuple[int, bool]] = []  # (callers, latency? else throughput)
    if any(c["concurrency"] == 1 for c in subset):
        views.append((1, True))
    top = busiest(subset)
    if top is not None:
        views.append((top, False))
    lines = []
    for concurrency, latency in views:
        winners: list[str | None] = []
        for length in lengths:
            picked = [_pick(subset, m, length, concurrency) for m in models]
            cells_here = {c["model"]: c for c in picked if c is not None}
            if len(cells_here) < 2:
                continue
            if latency:
                text, winner = compare({m: c["latency_ms"]["p50"] for m, c in cells_here.items()},
                                       names, True, " ms")
                label = "one caller, p50 latency"
            else:
                text, winner = compare({m: c["texts_per_s"] for m, c in cells_here.items()},
                                       names, False, " texts/s", 0)
                label = f"{concurrency} callers, throughput"
            winners.append(winner)
            lines.append(f"At {_served_tokens(subset, length)}, {label}: {text}.")
        leaders = [w for w in dict.fromkeys(winners) if w is not None]
        setting = "with one caller" if latency else f"with {concurrency} callers"
        if len(leaders) > 1:
            path = " → ".join(w or "tie" for w in winners)
            lines.append(f"The lead changes with length {setting} ({path}, from {lengths[0]} "
                         f"to {lengths[-1]} tokens).")
        elif leaders and None not in winners:
            lines.append(f"{leaders[0]} leads at every measured length {setting}.")
    return lines + _trend(subset, models, names, lengths)


def _trend(subset: list[dict[str, Any]], models: list[str], names: dict[str, str],
           lengths: list[int]) -> list[str]:
    """How the one-caller cost ratio of the LSTM and the from-scratch Transformer (else the
    first two models) moves from the shortest to the longest text."""
    by_architecture = {c["architecture"]: c["model"] for c in subset}
    pair = ([by_architecture["lstm"], by_architecture["transformer"]]
            if {"lstm", "transformer"} <= set(by_architecture) else models[:2])
    if len(lengths) < 2 or len(pair) != 2:
        return []
    first, second = pair
    ratios = []
    for length in (lengths[0], lengths[-1]):
        a, b = _pick(subset, first, length, 1), _pick(subset, second, length, 1)
        if a is None or b is None:
            return []
        ratios.append(b["latency_ms"]["p50"] / a["latency_ms"]["p50"])
    direction = ("grows" if ratios[1] > ratios[0] * (1 + TIE) else
                 "shrinks" if ratios[1] < ratios[0] * (1 - TIE) else "stays about the same")
    return [f"The one-caller latency ratio {names[second]}/{names[first]} {direction} with "
            f"length: {ratios[0]:.2f} at {lengths[0]} tokens, {ratios[1]:.2f} at "
            f"{lengths[-1]}. Served one text at a time, on this CPU, p50 includes fixed "
            "per-request costs (gRPC, batching delay) that dilute the difference in compute."]


def contender(row: dict[str, Any]) -> str:
    """How the report names a model: its architecture, and its teacher when distilled."""
    teacher = row.get("teacher")
    return f"{row['architecture']} distilled from {teacher}" if teacher else row["architecture"]


def quality_claims(quality: list[dict[str, Any]]) -> list[str]:
    rows = [q for q in quality if q.get("fp32_accuracy") is not None]
    lines = []
    if len(rows) >= 2:
        best, other = sorted(rows, key=lambda q: q["fp32_accuracy"], reverse=True)[:2]
        diff = best["fp32_accuracy"] - other["fp32_accuracy"]
        n = min(best.get("examples") or 0, other.get("examples") or 0)
        noise = ""
        if n:
            # Standard error of a difference of two accuracies on n examples each (treated as
            # independent, which overstates it a little for the same test set).
            se = math.sqrt(sum(q["fp32_accuracy"] * (1 - q["fp32_accuracy"]) / n
                               for q in (best, other)))
            noise = (f" — more than twice its standard error ({se:.3f}) on {n} examples"
                     if diff > 2 * se else
                     f" — within twice its standard error ({se:.3f}) on {n} examples, so not a "
                     "clear difference")
        lines.append(f"Quality (fp32, {best.get('dataset', '?')} {best.get('split', '?')}): "
                     f"{contender(best)} {best['fp32_accuracy']:.3f} accuracy / macro-F1 "
                     f"{fmt(best.get('fp32_macro_f1'), 3)} vs {contender(other)} "
                     f"{other['fp32_accuracy']:.3f} / {fmt(other.get('fp32_macro_f1'), 3)}: "
                     f"{contender(best)} is ahead by {diff * 100:.1f} points{noise}.")
    for q in rows:
        for precision in ("fp16", "int8"):
            agreement, accuracy = q.get(f"{precision}_agreement"), q.get(f"{precision}_accuracy")
            if agreement is None or accuracy is None:
                lines.append(f"{contender(q)}: no {precision} evaluation in the manifest.")
                continue
            changed = round((1 - agreement) * (q.get("examples") or 0))
            delta = (accuracy - q["fp32_accuracy"]) * 100
            hurt = agreement < 1.0 or delta < 0
            lines.append(f"{precision} {'changed' if hurt else 'did not hurt'} "
                         f"{contender(q)}: agreement with fp32 {agreement:.4f} ({changed} "
                         f"label(s) changed), accuracy {delta:+.2f} points.")
    return lines


def transfer_claims(quality: list[dict[str, Any]], cells: list[dict[str, Any]],
                    spinning: Any) -> list[str]:
    """What fine-tuning a pretrained encoder buys (accuracy over the best model trained from
    scratch) and what it costs to serve (against the from-scratch Transformer), from the
    numbers; nothing when no pretrained model was measured."""
    pretrained = next((q for q in quality if q["architecture"] == "pretrained"
                       and q.get("fp32_accuracy") is not None), None)
    scratch = [q for q in quality if q["architecture"] != "pretrained"
               and not q.get("teacher") and q.get("fp32_accuracy") is not None]
    if pretrained is None or not scratch:
        return []
    best = max(scratch, key=lambda q: q["fp32_accuracy"])
    gain = (pretrained["fp32_accuracy"] - best["fp32_accuracy"]) * 100
    lines = [f"Transfer learning buys {gain:+.1f} points of accuracy: the fine-tuned pretrained "
             f"encoder {pretrained['fp32_accuracy']:.3f} against the best model trained from "
             f"scratch ({best['architecture']}) {best['fp32_accuracy']:.3f}"
             + (f", after {pretrained['training_seconds']:.0f} s of fine-tuning against "
                f"{best['training_seconds']:.0f} s of training" if pretrained.get(
                    "training_seconds") and best.get("training_seconds") else "") + "."]
    subset = one_text_cells(cells, spinning)
    model_of = {c["architecture"]: c["model"] for c in subset}
    if not {"pretrained", "transformer"} <= set(model_of):
        return lines
    costs = []
    top = busiest(subset)
    for length in sorted({c["length"] for c in subset}):
        single = [_pick(subset, model_of[a], length, 1) for a in ("pretrained", "transformer")]
        loaded = [_pick(subset, model_of[a], length, top) if top else None
                  for a in ("pretrained", "transformer")]
        parts = []
        if all(single):
            parts.append(f"{single[0]['latency_ms']['p50'] / single[1]['latency_ms']['p50']:.1f}x"
                         " the one-caller p50")
        if top and top > 1 and all(loaded):
            parts.append(f"{loaded[1]['texts_per_s'] / loaded[0]['texts_per_s']:.1f}x fewer "
                         f"texts/s at {top} callers")
            efficiency = [c.get("texts_per_server_cpu_s") for c in loaded]
            if all(efficiency):
                parts.append(f"{efficiency[1] / efficiency[0]:.1f}x the server CPU per text")
        if parts:
            costs.append(f"at {_served_tokens(subset, length)}: " + ", ".join(parts))
    if costs:
        lines.append("What it costs against the from-scratch Transformer, " + "; ".join(costs)
                     + ".")
    sizes = [q.get("model_bytes", {}).get("fp32") if isinstance(q.get("model_bytes"), dict)
             else None for q in (pretrained, next((q for q in scratch
                                                    if q["architecture"] == "transformer"),
                                                   best))]
    if all(sizes):
        lines.append(f"Its fp32 artifact is {sizes[0] / 1e6:.0f} MB against "
                     f"{sizes[1] / 1e6:.1f} MB ({sizes[0] / sizes[1]:.0f}x).")
    return lines


def overhead_claims(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[str]:
    """One line per (architecture, spinning mode), listing every length."""
    delays = {run.get("spinning"): run.get("max_batch_delay_ms") for run in runs}
    groups: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("cpu_ratio") is not None or row.get("latency_overhead_ms") is not None:
            groups.setdefault((row["architecture"], row["spinning"]), []).append(row)
    lines = []
    for (architecture, spinning), group in groups.items():
        lengths = ", ".join(str(r["length"]) for r in group)
        parts = []
        ratios = [r.get("cpu_ratio") for r in group]
        if all(r is not None for r in ratios):
            met = sum(r >= GOAL_CPU_RATIO for r in ratios if r is not None)
            parts.append("(a) " + ", ".join(f"{r:.2f}" for r in ratios if r is not None)
                         + f" of in-process texts per CPU-second (goal ≥ {GOAL_CPU_RATIO}: met "
                         f"at {met} of {len(ratios)} lengths)")
        extras = [r.get("latency_overhead_ms") for r in group]
        if all(e is not None for e in extras):
            met = sum(e <= GOAL_LATENCY_MS for e in extras if e is not None)
            queues = [r.get("single_queue_p50_ms") for r in group]
            waiting = ""
            if all(q is not None for q in queues):
                delay = delays.get(spinning)
                setting = f" (max_batch_delay_ms={delay:g})" if delay is not None else ""
                waiting = (", of which " + ", ".join(f"{q:.2f}" for q in queues if q is not None)
                           + f" ms was waiting in the batcher{setting}")
            parts.append("(b) " + ", ".join(f"{e:+.2f}" for e in extras if e is not None)
                         + f" ms over in-process batch 1{waiting} (goal ≤ {GOAL_LATENCY_MS:g} "
                         f"ms: met at {met} of {len(extras)} lengths)")
        lines.append(f"Serving overhead, {architecture}, spinning {spin_label(spinning)}, at "
                     f"{lengths} tokens: " + "; ".join(parts) + ".")
    return lines


def spinning_claims(cells: list[dict[str, Any]]) -> list[str]:
    modes = {c["spinning"] for c in cells}
    if not {True, False} <= modes:
        return []
    lines = []
    for model in sorted({c["model"] for c in cells}):
        pairs = []
        for length in sorted({c["length"] for c in cells}):
            off, on = ([c for c in one_text_cells(cells, mode) if c["model"] == model
                        and c["length"] == length] for mode in (False, True))
            if off and on:
                top_off = max(off, key=lambda c: c["concurrency"])
                top_on = max(on, key=lambda c: c["concurrency"])
                pairs.append(f"{length}: {top_on['texts_per_s'] / top_off['texts_per_s']:.2f}x")
        if pairs:
            arch = next(c["architecture"] for c in cells if c["model"] == model)
            lines.append(f"Spinning on vs off, {arch}, throughput at the most callers, by "
                         f"length: {', '.join(pairs)}.")
    return lines


def caveats(document: dict[str, Any]) -> list[str]:
    cells = document["cells"]
    machine = document.get("machine", {})
    notes = []
    devices = {c.get("device") for c in cells}
    if devices <= {"cpu"}:
        notes.append("CPU only. The fp16 figures come from the exporter's evaluation: on CPU "
                     "ONNX Runtime computes an fp16 model through inserted casts in fp32, so "
                     "fp16 agreement measures weight/activation rounding, not fp16 arithmetic, "
                     "and the server runs the fp32 artifact.")
    notes.append(f"Absolute times hold only for this machine ({machine.get('cpu_count')} CPUs, "
                 f"{machine.get('platform')}, ONNX Runtime {machine.get('onnxruntime')}); the "
                 "ratios between architectures and against in-process are what carry over.")
    busy = busy_machine(document)
    if busy:
        notes.append(busy[0].upper() + busy[1:] + ".")
    truncated = sorted({c["length"] for c in cells if (c.get("truncated_fraction") or 0) > 0})
    if truncated:
        notes.append(f"Lengths {', '.join(map(str, truncated))} exceed a model's max_length: the "
                     "server truncated those texts, so those cells measure the max_length.")
    if document.get("text_source") == "synthetic":
        notes.append("Texts were synthetic words, not dataset texts.")
    fewest = min((c["ok"] for c in cells), default=0)
    if fewest < P99_REQUESTS:
        notes.append(f"Some cells have only {fewest} successful requests: their p99 rests on "
                     f"about {max(1, fewest // 100)} sample(s) and is indicative only.")
    tick = machine.get("cpu_tick_s", 0.01)
    coarse = [c for c in cells if c.get("server_cpu_s") is not None
              and c["server_cpu_s"] < 100 * tick]
    if coarse:
        notes.append(f"{len(coarse)} cell(s) used under {100 * tick:g} server CPU-seconds; "
                     f"/proc counts in {tick:g} s ticks, so their CPU figures are coarse.")
    if any(c.get("server_cpu_s") is None for c in cells):
        notes.append("Some cells ran against a server bench did not start: its CPU time, and "
                     "so ratio (a), is unknown.")
    disturbed = [r for r in document.get("inprocess", []) if r["batch_size"] == 1
                 and r["latency_ms"]["p50"] and r["ort_latency_ms"]["p50"]
                 and r["latency_ms"]["p50"] > 2 * r["ort_latency_ms"]["p50"] + 1.0]
    if disturbed:
        where = ", ".join(f"{r['architecture']} {r['length']} spinning {spin_label(r['spinning'])}"
                          f" ({r['latency_ms']['p50']:.2f} ms vs {r['ort_latency_ms']['p50']:.2f})"
                          for r in disturbed)
        notes.append("In-process batch-1 p50 with tokenization was more than twice ORT's alone "
                     f"(+1 ms) for {where}: that baseline was disturbed (spin-waiting threads "
                     "and other load competing for the cores), so its (b) is unreliable.")
    negative = [r for r in document.get("overhead", [])
                if (r.get("latency_overhead_ms") or 0) < 0]
    if negative:
        notes.append(f"{len(negative)} (b) figure(s) are negative — the in-process baseline "
                     "was slower than the server: noise, not a real gain.")
    client = sum(c.get("client_cpu_s") or 0 for c in cells)
    server = sum(c.get("server_cpu_s") or 0 for c in cells)
    if server:
        notes.append(f"The load generator ran on the same machine and used {client:.1f} "
                     f"CPU-seconds against the server's {server:.1f}: it competes for the CPU.")
    notes += [f"bench warning: {w}" for w in document.get("warnings", [])]
    return notes
