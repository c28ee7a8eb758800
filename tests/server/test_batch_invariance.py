"""A served answer does not depend on what it was batched with: every architecture, every
precision, on real mixed-length traffic through a real server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from harness.server import server_settings
from harness.tiny_models import LSTM_NAME, PRETRAINED_NAME, TRANSFORMER_NAME, corpus

from export.gates import GateSettings
from service.repo.layout import latest_version

pytestmark = pytest.mark.slow

TOLERANCE = GateSettings().batch_invariance_tolerance
# Short texts and long ones (several sentences joined), so batches mix lengths and padding.
SHORT = corpus(24, seed=21)
LONG = [" ".join(corpus(6, seed=100 + i)) for i in range(8)]


def _probabilities(result, labels: list[str]) -> np.ndarray:
    served = dict(result.top)
    return np.array([served[label] for label in labels])


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_a_text_gets_the_same_answer_alone_and_in_mixed_batches(
        three_architectures: Path, start_server, precision: str) -> None:
    names = [name for name in (LSTM_NAME, TRANSFORMER_NAME, PRETRAINED_NAME)
             if latest_version(three_architectures, name).load_manifest().artifact(precision)]
    assert TRANSFORMER_NAME in names  # every precision has at least one model to check
    # A forced precision refuses models without that artifact: serve the others.
    running = start_server(server_settings(three_architectures, precision=precision,
                                           strict_startup=False, max_batch_delay_ms=20,
                                           batch_cost_tokens=4096))
    texts = SHORT + LONG
    with running.client(timeout=60) as client:
        for name in names:
            labels = client.get_model(name).labels
            assert client.get_model(name).precision == precision
            alone = []
            for text in texts:  # one call at a time: each text is a batch of one
                answer = client.classify([text], model=name, top_k=len(labels))
                assert answer.timing.batch_size == 1
                alone.append(_probabilities(answer.results[0], labels))
            # All at once from many callers: the batcher mixes short texts with long ones.
            pending = [client.classify_async([text], model=name, top_k=len(labels))
                       for text in texts * 2]
            answers = [p.result(timeout=60) for p in pending]
            assert max(a.timing.batch_size for a in answers) > 1
            for index, answer in enumerate(answers):
                batched = _probabilities(answer.results[0], labels)
                difference = np.abs(batched - alone[index % len(texts)]).max()
                assert difference <= TOLERANCE, (name, precision, index, difference)
