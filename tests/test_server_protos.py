"""The committed generated protobuf modules must match their .proto files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from protos.generate import PROTO_FILES, ROOT, generate
from protos.seqserve.v1 import seqserve_pb2

# Toolchain version stamps differ between grpcio-tools releases without the code changing.
_STAMPS = re.compile(r"(Protobuf Python Version: .*|GRPC_GENERATED_VERSION = .*|"
                     r"ValidateProtobufRuntimeVersion\([^)]*\))")


def _normalised(path: Path) -> str:
    return _STAMPS.sub("<version>", path.read_text(encoding="utf-8"))


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    fresh = generate(tmp_path)
    assert len(fresh) == 3 * len(PROTO_FILES)
    stale = [str(path.relative_to(tmp_path)) for path in fresh
             if not (ROOT / path.relative_to(tmp_path)).is_file()
             or _normalised(path) != _normalised(ROOT / path.relative_to(tmp_path))]
    assert not stale, f"stale generated code, run `python -m protos.generate`: {stale}"


def test_every_field_of_the_native_api_is_documented() -> None:
    """Each message and field of seqserve.proto has a comment (Triton's protos as the model)."""
    text = (ROOT / "protos/seqserve/v1/seqserve.proto").read_text(encoding="utf-8")
    lines = text.splitlines()
    undocumented = []
    for number, line in enumerate(lines):
        stripped = line.strip()
        is_field = re.match(r"^(optional |repeated )?[\w.]+ \w+ = \d+;", stripped)
        is_rpc = stripped.startswith("rpc ")
        if (is_field or is_rpc) and not _has_comment_before(lines, number):
            undocumented.append(stripped)
    assert undocumented == []
    assert seqserve_pb2.DESCRIPTOR.package == "seqserve.v1"


def _has_comment_before(lines: list[str], number: int) -> bool:
    previous = lines[number - 1].strip() if number else ""
    return previous.startswith("//")
