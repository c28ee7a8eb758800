"""What the tests share: real servers, tiny real models, Prometheus, the CLI."""

from pathlib import Path

#: The repository checkout the tests run from.
REPO_ROOT = Path(__file__).resolve().parents[2]
