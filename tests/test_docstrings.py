"""Every public class and function of ``fused_gate.__all__`` has a docstring that names each argument.

Walks ``fused_gate.__all__``: functions, classes (their constructor's arguments and every public method
the class defines, such as ``forward``) and modules (through their own ``__all__``, recursively), so
whatever is added to the public API is covered without touching this file. An argument counts as named
when the docstring has an ``Args:``-style entry for it (``name:`` or ``a, name, b:`` at the start of a
line) or spells it in double backticks (````name````).
"""

from __future__ import annotations

import inspect
import re
import types

import pytest

import fused_gate


def public_objects(module: types.ModuleType, prefix: str) -> list[tuple[str, object]]:
    """``(dotted name, object)`` of every class and function a module exports, modules walked through."""
    found = []
    for name in module.__all__:
        obj = getattr(module, name)
        if isinstance(obj, types.ModuleType):
            found += public_objects(obj, f"{prefix}.{name}")
        elif inspect.isclass(obj):
            found.append((f"{prefix}.{name}", obj))
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and inspect.isfunction(member):
                    found.append((f"{prefix}.{name}.{attr}", member))
        elif callable(obj):
            found.append((f"{prefix}.{name}", obj))
    return found


def arguments(obj: object) -> list[str]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    params = inspect.signature(target).parameters.values()
    return [p.name for p in params if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def docstring(obj: object) -> str:
    parts = [inspect.getdoc(obj) or ""]
    if inspect.isclass(obj) and "__init__" in vars(obj):
        parts.append(inspect.getdoc(obj.__init__) or "")
    return "\n".join(parts)


def names(doc: str, argument: str) -> bool:
    entry = rf"^\s*(\w+, )*{argument}(, \w+)*( \([^)]*\))?:"  # "name:", "a, name, b:", "name (int):"
    return bool(re.search(rf"{entry}|``{argument}``", doc, re.M))


PUBLIC = public_objects(fused_gate, "fused_gate")


def test_the_walk_finds_classes_methods_and_module_members():
    found = dict(PUBLIC)
    assert {"fused_gate.AttentionMix", "fused_gate.AttentionMix.forward", "fused_gate.MMoE"} <= set(found)
    assert "fused_gate.reference.attention_mix" in found


def test_names_requires_an_entry_or_backticks():
    doc = "Mix.\n\nArgs:\n    h: experts.\n    top_k (int): keep.\n    a, b, c: as in f.\n\nUses ``mask`` and scale."
    assert all(names(doc, a) for a in ("h", "top_k", "mask", "a", "b", "c"))
    assert not names(doc, "scale") and not names(doc, "x") and not names(doc, "Mix")


@pytest.mark.parametrize("obj", [obj for _, obj in PUBLIC], ids=[name for name, _ in PUBLIC])
def test_docstring_names_every_argument(obj):
    doc = docstring(obj)
    assert doc.strip(), "no docstring"
    missing = [a for a in arguments(obj) if not names(doc, a)]
    assert not missing, f"the docstring does not name {missing}"
