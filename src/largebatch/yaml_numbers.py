"""YAML reading where every float spelling Python accepts is a number.

PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent: ``1e-3``, ``5e-4`` and
``6.4e1`` come back as strings, and a config then refuses ``optim.lr: 1e-3`` as "not a number".
YAML 1.2 (and every other reader) takes them as floats; so does this loader.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

__all__ = ["NumberLoader", "load_yaml"]


class NumberLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3``, ``5E4``, ``+2e+1`` and ``.5e-3`` as floats."""


# exponent forms YAML 1.1 leaves as strings; tried after the built-in resolvers, so that
# integers, 1.1 floats, booleans and the rest keep their meaning
NumberLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2's floats."""
    return yaml.load(text, Loader=NumberLoader)
