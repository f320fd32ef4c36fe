"""Tokenize a corpus once into memory-mapped shards (for multi-node runs), then train with
``data.prepared_dir=OUT`` (a directory every node can read).

    python scripts/prepare_data.py --out $SCRATCH/prepared/kjv                  # the bundled corpus
    python scripts/prepare_data.py --source files --path 'corpus/*.jsonl' --out $SCRATCH/prepared/mine --num-proc 8
    python scripts/prepare_data.py --source hf --path roneneldan/TinyStories --validation-split validation \
        --vocab-size 32000 --out $SCRATCH/prepared/tinystories

Every ``DataConfig`` field is an option (``--seq-len``, ``--tokenizer``, ...). Writes OUT/tokenizer,
OUT/train, OUT/validation and OUT/data_config.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import typing
from pathlib import Path

from pararnn_lm.data.build import prepare_dataset
from pararnn_lm.data.config import DataConfig


def _optional(kind):
    # "none"/"null" -> None for Optional fields (e.g. --tokenizer-train-max-chars none)
    return lambda text: None if text.lower() in ("none", "null") else kind(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (data.prepared_dir of later runs)")
    hints = typing.get_type_hints(DataConfig)
    for f in dataclasses.fields(DataConfig):
        hint = hints[f.name]
        base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if base is bool:
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=default, metavar="BOOL")
        elif typing.get_origin(base) is list:
            parser.add_argument(flag, nargs="*", default=default)
        else:
            parser.add_argument(flag, type=_optional(base), default=default)
    return parser


def main(argv: list[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    args = vars(_parser().parse_args(argv))
    out = args.pop("out")
    return prepare_dataset(DataConfig(**args), out)


if __name__ == "__main__":
    main()
