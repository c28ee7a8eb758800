"""Pack the GPU check's bundle into parts small enough to carry, and join them back.

The device machine has no network, and each call that reaches it carries at most 64 MiB, while
the onnxruntime-gpu wheel alone is ~255 MB. So ``prepare.sh`` unpacks the wheels the GPU image
lacks into one ``site/`` directory here (``unpack``: no pip and no install step there, and the
files the check never loads, such as ORT's TensorRT provider and its Python tooling, left out),
compresses the bundle (site, model repository, training runs) with xz, and this splits it into
numbered parts of at most ``--part-mib`` with a ``SHA256SUMS`` of the whole; ``check.sh`` joins
the parts, verifies the sum, and unpacks. Standard library only: it runs on the GPU host before
anything is installed.

    python3 bundle.py unpack WHEEL... --into site/
    python3 bundle.py split bundle.tar.xz --into parts/ [--part-mib 60]
    python3 bundle.py join parts/ --into bundle.tar.xz
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import sys
import zipfile
from pathlib import Path, PurePosixPath

PART_MIB = 60  # under the 64 MiB a call carries, leaving room for the working tree
SUMS_FILE = "SHA256SUMS"
CHUNK = 1 << 20
# What the check never loads: ORT's TensorRT provider (the GPU image has no TensorRT) and its
# Python tooling (quantization, transformer fusion, converters: export-time code). ~2 MB
# compressed, but nothing carried is free.
LEFT_OUT = (
    "onnxruntime/capi/libonnxruntime_providers_tensorrt.so",
    "onnxruntime/tools/*", "onnxruntime/transformers/*", "onnxruntime/quantization/*",
    "onnxruntime/datasets/*", "onnxruntime/backend/*",
    "*/__pycache__/*",
)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def split(source: Path, into: Path, part_mib: int = PART_MIB) -> list[Path]:
    """``into/NAME.part-000``, ... and ``into/SHA256SUMS`` (the sum of the whole file)."""
    if part_mib < 1:
        raise ValueError("--part-mib must be >= 1")
    into.mkdir(parents=True, exist_ok=True)
    for stale in into.glob(f"{source.name}.part-*"):
        stale.unlink()
    limit, parts = part_mib << 20, []
    with source.open("rb") as handle:
        while True:
            part = into / f"{source.name}.part-{len(parts):03d}"
            written = 0
            with part.open("wb") as out:
                while written < limit and (block := handle.read(min(CHUNK, limit - written))):
                    out.write(block)
                    written += len(block)
            if written == 0:
                part.unlink()
                break
            parts.append(part)
    (into / SUMS_FILE).write_text(f"{sha256(source)}  {source.name}\n", encoding="utf-8")
    return parts


def join(parts_dir: Path, into: Path) -> Path:
    """Concatenate the parts in order; raises ValueError when the sum does not match."""
    expected, name = (parts_dir / SUMS_FILE).read_text(encoding="utf-8").split()
    parts = sorted(parts_dir.glob(f"{name}.part-*"))
    if not parts:
        raise ValueError(f"{parts_dir}: no {name}.part-* files")
    numbers = [int(p.name.rsplit("-", 1)[1]) for p in parts]
    if numbers != list(range(len(parts))):
        raise ValueError(f"{parts_dir}: parts {numbers} are not 0..{len(parts) - 1}: one is "
                         "missing (each device call carries one; was one left out?)")
    into.parent.mkdir(parents=True, exist_ok=True)
    with into.open("wb") as out:
        for part in parts:
            with part.open("rb") as handle:
                while block := handle.read(CHUNK):
                    out.write(block)
    actual = sha256(into)
    if actual != expected:
        into.unlink()
        raise ValueError(f"{into.name}: sha256 {actual[:12]}… is not {expected[:12]}…: a part "
                         "is corrupt or stale")
    return into


def unpack(wheels: list[Path], into: Path, left_out: tuple[str, ...] = LEFT_OUT) -> list[str]:
    """Unpack each wheel into ``into`` as ``pip install --target --no-deps`` would lay it out
    (a ``NAME.data/purelib`` or ``platlib`` tree goes to the top; scripts and headers are not
    needed), without the files matching ``left_out``; the names left out."""
    skipped = []
    into.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for info in archive.infolist():
                if info.is_dir():
                    continue
                path = PurePosixPath(info.filename)
                if path.parts[0].endswith(".data"):
                    if len(path.parts) < 3 or path.parts[1] not in ("purelib", "platlib"):
                        continue
                    path = PurePosixPath(*path.parts[2:])
                if ".." in path.parts or path.is_absolute():
                    raise ValueError(f"{wheel.name}: unsafe path {info.filename}")
                if any(fnmatch.fnmatch(str(path), pattern) for pattern in left_out):
                    skipped.append(str(path))
                    continue
                target = into / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(info))
                if info.external_attr >> 16 & 0o111:  # shared libraries keep their x bit
                    target.chmod(0o755)
    return skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    split_parser = commands.add_parser("split", help="split FILE into parts")
    split_parser.add_argument("file", type=Path)
    split_parser.add_argument("--into", type=Path, required=True)
    split_parser.add_argument("--part-mib", type=int, default=PART_MIB)
    join_parser = commands.add_parser("join", help="join the parts in DIR")
    join_parser.add_argument("parts", type=Path)
    join_parser.add_argument("--into", type=Path, required=True)
    unpack_parser = commands.add_parser("unpack", help="unpack wheels into one directory")
    unpack_parser.add_argument("wheels", type=Path, nargs="+")
    unpack_parser.add_argument("--into", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "unpack":
            skipped = unpack(args.wheels, args.into)
            print(f"{len(args.wheels)} wheel(s) into {args.into}; left out {len(skipped)} "
                  "file(s) the check never loads")
        elif args.command == "split":
            for part in split(args.file, args.into, args.part_mib):
                print(part)
        else:
            print(join(args.parts, args.into))
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        print(f"bundle.py: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
