"""What every bench script starts with: where the data is, and checks of the command line.

The scripts run as ``python bench/<script>.py``, so this folder is on their path
and they import it as ``common``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from edgesnn.privatize import TrainConfig

DATA = "/usr/share/datasets/fashion-mnist"  # the full Fashion-MNIST set: apt-get install -y dataset-fashion-mnist
ROOT = Path(__file__).resolve().parent.parent  # the repository


def require_data() -> None:
    """Exit with a one-line error where the Fashion-MNIST set is not installed."""
    if not Path(DATA).is_dir():
        sys.exit(f"error: {DATA} not found; run `apt-get install -y dataset-fashion-mnist`")


def known_names(text: str, known, kind: str = "model") -> list[str]:
    """The comma-separated names of ``text``; exits with a one-line error naming any not in ``known``."""
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in known]
    if unknown:
        sys.exit(f"error: unknown {kind}(s) {', '.join(unknown)}; expected some of {', '.join(known)}")
    return names


def parse_fields(text: str, config_class, option: str, parser: argparse.ArgumentParser) -> dict:
    """``KEY=VALUE,...`` of ``option`` as fields of the dataclass ``config_class``, each value parsed as its
    field's type (int, float, str or bool); a usage error otherwise."""
    fields = {field.name: field.type for field in dataclasses.fields(config_class)}
    changes = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        kind = fields.get(key)
        try:
            if kind == "bool" and value.lower() in ("true", "false"):
                changes[key] = value.lower() == "true"
            elif kind in ("int", "float", "str"):
                changes[key] = {"int": int, "float": float, "str": str}[kind](value)
            else:
                raise ValueError
        except ValueError:
            names = ", ".join(sorted(name for name, kind in fields.items() if kind in ("int", "float", "str", "bool")))
            parser.error(f"{option} {item}: expected FIELD=VALUE with FIELD one of {names} and VALUE of its type")
    return changes


def parse_train(text: str, parser: argparse.ArgumentParser) -> dict:
    """``--train KEY=VALUE,...`` as TrainConfig fields."""
    return parse_fields(text, TrainConfig, "--train", parser)
