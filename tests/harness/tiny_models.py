"""A tiny but real model repository for the server tests.

Two models trained for a few seconds on a separable synthetic dataset and exported through the
real pipeline (dynamo ONNX export in a subprocess, parity and fp16 gates, atomic publish):
``tiny-lstm`` (2 labels, max length 32) and ``tiny-transformer`` (3 labels, max length 24).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from harness.synthetic import FILLER, NEGATIVE_WORDS, NEUTRAL_WORDS, POSITIVE_WORDS
from harness.tiny_runs import train_tiny_run
from service.repo.manifest import MANIFEST_FILE

LSTM_NAME, TRANSFORMER_NAME = "tiny-lstm", "tiny-transformer"
PRETRAINED_NAME = "tiny-pretrained"
LSTM_LABELS = ["negative", "positive"]
TRANSFORMER_LABELS = ["negative", "neutral", "positive"]
MAX_LENGTH = {LSTM_NAME: 32, TRANSFORMER_NAME: 24}

_WORDS = FILLER + POSITIVE_WORDS + NEGATIVE_WORDS + NEUTRAL_WORDS


def _tiny_gates() -> object:
    from export.gates import GateSettings

    # The int8 speed check measures this machine, and at these toy sizes per-op overheads
    # decide it: the tiny models keep their int8 so the serving tests can serve it.
    return GateSettings(int8_min_speedup=0.0)


def corpus(count: int = 400, seed: int = 0) -> list[str]:
    """Texts of 3–13 words drawn from the tiny models' vocabulary."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, size=rng.integers(3, 14))) for _ in range(count)]


def build_tiny_repository(root: Path) -> Path:
    """``root/tiny-lstm/1/`` and ``root/tiny-transformer/1/``, complete and verified."""
    from export.pipeline import export_run

    runs = root.parent / f"{root.name}-runs"
    lstm = train_tiny_run(runs, "lstm", labels=["positive", "negative"],
                          max_length=MAX_LENGTH[LSTM_NAME], name=LSTM_NAME)
    transformer = train_tiny_run(runs, "transformer", labels=TRANSFORMER_LABELS,
                                 max_length=MAX_LENGTH[TRANSFORMER_NAME], name=TRANSFORMER_NAME)
    export_run(lstm, root, LSTM_NAME, gates=_tiny_gates())
    export_run(transformer, root, TRANSFORMER_NAME, gates=_tiny_gates())
    return root


def copy_version(repository: Path, name: str, source: int, target: int, *,
                 corrupt: bool = False) -> Path:
    """Publish ``source`` again as ``target`` (atomically, like the exporter); ``corrupt`` flips
    bytes in the fp32 artifact after its sha256 was recorded."""
    staging = repository / name / f".tmp-copy-{target}"
    shutil.copytree(repository / name / str(source), staging)
    manifest_path = staging / MANIFEST_FILE
    data = json.loads(manifest_path.read_text())
    data["version"] = target
    manifest_path.write_text(json.dumps(data, indent=2))
    if corrupt:
        artifact = staging / "model.fp32.onnx"
        payload = bytearray(artifact.read_bytes())
        payload[-1] ^= 0xFF  # still a file of the same size, but not the one that was evaluated
        artifact.write_bytes(bytes(payload))
    final = repository / name / str(target)
    staging.rename(final)
    return final


def build_tiny_pretrained(root: Path) -> Path:
    """``root/tiny-pretrained/1/``: a tiny random BERT saved as a Hugging Face directory,
    fine-tuned for a few seconds and exported through the real pipeline."""
    from export.pipeline import export_run
    from harness.tiny_pretrained import save_tiny_encoder

    base = save_tiny_encoder(root.parent / f"{root.name}-base", "bert")
    run = train_tiny_run(root.parent / f"{root.name}-runs", "pretrained", name=PRETRAINED_NAME,
                         base=base, epochs=4, learning_rate=3e-3,
                         labels=["positive", "negative"], max_length=MAX_LENGTH[LSTM_NAME])
    export_run(run, root, PRETRAINED_NAME, gates=_tiny_gates())
    return root
