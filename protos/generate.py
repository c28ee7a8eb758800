"""Regenerates the Python modules of the ``.proto`` files under ``protos/``.

Run from the repository root: ``python -m protos.generate``. Protos are compiled with ``-I .``
so the generated modules import each other as ``protos.seqserve.v1.seqserve_pb2``. The outputs
are committed; ``tests/test_server_protos.py`` regenerates into a temporary directory and fails
when the committed files are stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_FILES = (
    "protos/seqserve/v1/seqserve.proto",
    "protos/inference/grpc_predict_v2.proto",
)


def generate(out_dir: Path = ROOT) -> list[Path]:
    """Compiles every proto into ``out_dir`` (same relative layout); returns the files written."""
    from grpc_tools import protoc  # dev dependency: imported only when generating

    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(ROOT / name) for name in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see its message above")
    written = []
    for name in PROTO_FILES:
        stem = name.removesuffix(".proto")
        written += [out_dir / f"{stem}{end}" for end in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]
    return written


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(ROOT))
    sys.exit(0)
