"""The committed generated protobuf modules must match their .proto files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from protos.generate import PROTO_FILES, ROOT, generate
from protos.seqserve.v1 import seqserve_pb2

NATIVE_PROTO = "protos/seqserve/v1/seqserve.proto"
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


def _undocumented(root: Path, proto: str, out: Path) -> tuple[list[str], int]:
    """The elements of ``root/proto`` without a leading comment, and how many were checked;
    compiled by protoc with its comments (``--include_source_info``)."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"
    assert protoc.main(["grpc_tools.protoc", f"-I{root}", f"-I{include}",
                        "--include_source_info", f"--descriptor_set_out={out}",
                        str(root / proto)]) == 0
    file = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    comments = {tuple(location.path): location.leading_comments.strip()
                for location in file.source_code_info.location}
    elements = _elements(file)
    return [name for name, path in elements if not comments.get(path)], len(elements)


def _elements(file) -> list[tuple[str, tuple[int, ...]]]:
    """Every service, method, message (nested too), field, enum and enum value, with the
    source-info path protoc gives its declaration (descriptor.proto field numbers)."""
    found = []

    def message(m, path, prefix):
        name = f"{prefix}{m.name}"
        found.append((f"message {name}", path))
        for i, f in enumerate(m.field):
            found.append((f"field {name}.{f.name}", (*path, 2, i)))
        for i, nested in enumerate(m.nested_type):
            message(nested, (*path, 3, i), f"{name}.")
        for i, e in enumerate(m.enum_type):
            enum(e, (*path, 4, i), f"{name}.")

    def enum(e, path, prefix):
        found.append((f"enum {prefix}{e.name}", path))
        for i, v in enumerate(e.value):
            found.append((f"enum value {prefix}{e.name}.{v.name}", (*path, 2, i)))

    for i, m in enumerate(file.message_type):
        message(m, (4, i), "")
    for i, e in enumerate(file.enum_type):
        enum(e, (5, i), "")
    for i, s in enumerate(file.service):
        found.append((f"service {s.name}", (6, i)))
        for j, method in enumerate(s.method):
            found.append((f"rpc {s.name}.{method.name}", (6, i, 2, j)))
    return found


def test_every_element_of_the_native_api_is_documented(tmp_path: Path) -> None:
    """Each service, rpc, message, field, enum and enum value of seqserve.proto has a comment
    (Triton's protos as the model)."""
    undocumented, checked = _undocumented(ROOT, NATIVE_PROTO, tmp_path / "d.pb")
    assert checked > 60  # every kind was found, nested fields included
    assert undocumented == []
    assert seqserve_pb2.DESCRIPTOR.package == "seqserve.v1"


def test_the_documentation_check_sees_a_missing_comment(tmp_path: Path) -> None:
    text = (ROOT / NATIVE_PROTO).read_text(encoding="utf-8")
    stripped = text.replace("  // Never sent by the server (proto3's required zero value).\n", "")
    assert stripped != text
    (tmp_path / NATIVE_PROTO).parent.mkdir(parents=True)
    (tmp_path / NATIVE_PROTO).write_text(stripped, encoding="utf-8")
    undocumented, _ = _undocumented(tmp_path, NATIVE_PROTO, tmp_path / "d.pb")
    assert undocumented == ["enum value ModelState.MODEL_STATE_UNSPECIFIED"]
