"""The names of fused_gate's ``torch.library`` operators, which carry the version of their schemas.

``torch.compile`` keeps compiled graphs in on-disk caches (Inductor's FX graph cache and the
AOTAutograd cache, under ``TORCHINDUCTOR_CACHE_DIR``) keyed on the traced graph. The graph names each
custom operator but does not hold its schema, and the compiled code calls the operator with the
arguments of the schema it was compiled against. Had an upgrade changed an operator's arguments under
the same name, a warm cache would hand the new version code written for the old schema ("expected at
most 6 argument(s) but received 7"). So every operator is registered as
``fused_gate::<name>_v<SCHEMA_VERSION>``: a schema change comes with a new version, which renames every
operator, so the old cache entries no longer match and are never loaded.

``SCHEMA_HASHES`` records the hash of all the operators' schemas at each version;
``tests/test_op_names.py`` fails when the live schemas match no recorded hash, and its message says
which version to add.
"""

from __future__ import annotations

import hashlib
import re

import torch

NAMESPACE = "fused_gate"
SCHEMA_VERSION = 2
# version -> schema_hash() of the operators registered at that version (a new version is added, never edited).
SCHEMA_HASHES = {
    1: "7ff119503090c38d",
    2: "3043dfdf678809bd",  # experts_mix takes for_backward; experts_mix_backward
}

_REGISTERED: list[str] = []


def op_name(name: str) -> str:
    """The registered name of operator ``name``: ``"fused_gate::<name>_v<SCHEMA_VERSION>"``."""
    _REGISTERED.append(name)
    return f"{NAMESPACE}::{name}_v{SCHEMA_VERSION}"


def op_schemas() -> dict[str, str]:
    """Every operator registered through :func:`op_name`, as ``name -> schema`` with the version left out
    of the schema's name (so that the schemas, not the version, are compared)."""
    schemas = {}
    for name in _REGISTERED:
        schema = str(getattr(getattr(torch.ops, NAMESPACE), f"{name}_v{SCHEMA_VERSION}").default._schema)
        schemas[name] = re.sub(rf"^{NAMESPACE}::{name}_v\d+", f"{NAMESPACE}::{name}", schema)
    return schemas


def schema_hash() -> str:
    """A short hash of :func:`op_schemas`, independent of registration order."""
    text = "\n".join(sorted(op_schemas().values()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
