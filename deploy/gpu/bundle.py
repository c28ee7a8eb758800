"""Pack the GPU check's bundle into parts small enough to carry, and join them back.

The device machine has no network, and each call that reaches it carries at most 64 MiB, while
the onnxruntime-gpu wheel alone is ~255 MB. So ``prepare.sh`` tars the bundle (wheels, model
repository, training runs) and this splits the tar into numbered parts of at most ``--part-mib``
with a ``SHA256SUMS`` of the whole; ``check.sh`` joins the parts, verifies the sum, and unpacks.
Standard library only: it runs on the GPU host before anything is installed.

    python3 bundle.py split bundle.tar --into parts/ [--part-mib 60]
    python3 bundle.py join parts/ --into bundle.tar
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

PART_MIB = 60  # under the 64 MiB a call carries, leaving room for the working tree
SUMS_FILE = "SHA256SUMS"
CHUNK = 1 << 20


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
    args = parser.parse_args(argv)
    try:
        if args.command == "split":
            for part in split(args.file, args.into, args.part_mib):
                print(part)
        else:
            print(join(args.parts, args.into))
    except (OSError, ValueError) as error:
        print(f"bundle.py: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
