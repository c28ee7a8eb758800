"""A model's serving overrides, kept in the repository beside its versions (``serving.json``).

    model_repository/sentiment-pretrained/serving.json    {"precision": "fp32",
    model_repository/sentiment-pretrained/1/ ...           "intra_op_threads": 1}

What the server would otherwise decide for every model alike (``--precision``, the thread
rule) can be set here for one model, for all of its versions, by whoever publishes it; the
server reads the file each time it loads a version. A missing file means no overrides.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.repo.manifest import ManifestError

SERVING_CONFIG_FILE = "serving.json"


class ServingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    precision: Literal["auto", "fp32", "fp16", "int8"] | None = Field(
        default=None, description="overrides --precision for this model; a named precision "
        "is served even if it failed its gates, as with the flag")
    intra_op_threads: int | None = Field(
        default=None, ge=1, le=256,
        description="ONNX Runtime intra-op threads of this model's CPU sessions, instead of "
        "the rule by compute per token")


def read_serving_config(model_directory: Path) -> ServingConfig:
    """The overrides in ``model_directory/serving.json``; raises ``ManifestError`` (one line,
    naming the field) when the file exists but is not valid."""
    path = model_directory / SERVING_CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ServingConfig()
    except OSError as error:
        raise ManifestError(f"{path}: cannot read: {error.strerror or error}") from error
    try:
        return ServingConfig.model_validate(json.loads(text))
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path}: not JSON: {error.msg} at line {error.lineno}") from error
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(root)"
        raise ManifestError(f"{path}: invalid at '{where}': {first['msg']}") from error
