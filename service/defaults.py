"""Defaults shared by several commands and packages, defined once.

A leaf module: it imports nothing from the project, so every layer may use it.
"""

from __future__ import annotations

from pathlib import Path

#: Where models are published and served from, relative to the working directory.
REPOSITORY = Path("model_repository")
#: Where training runs are written.
RUNS = Path("runs")
#: The seed of data splits, training, benchmark texts and arrivals.
SEED = 13
#: The gRPC port of ``seqserve serve``, and the address clients use by default.
GRPC_PORT = 50051
SERVER = f"localhost:{GRPC_PORT}"
#: The Prometheus /metrics port of ``seqserve serve``.
METRICS_PORT = 9400
