"""A griffe extension for the API reference (used by mkdocs.yml; not part of the package).

* A dataclass field declared as ``name: T = field(default=..., metadata={"help": "..."})`` (``DeltaMemConfig``,
  ``DeltaMemSFTConfig``) is shown as ``name: T = <default>`` with its ``help`` text as its description, so every field
  is documented from the one place it is written.
* Sphinx cross-reference roles in docstrings (``:class:`~peft_deltamem.memory.state.MemoryState```) become code spans
  (``MemoryState``), since docstrings are rendered as Markdown.
"""

from __future__ import annotations

import ast
import re
from typing import Any

import griffe

_ROLES = r":(?:class|func|meth|mod|attr|data|exc|obj):"
_ROLE_SHORT = re.compile(_ROLES + r"`~([\w.]+)`")
_ROLE_FULL = re.compile(_ROLES + r"`([\w.]+)`")


def _field_call(value: ast.AST | None) -> ast.Call | None:
    if isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", None)) == "field":
        return value
    return None


def _help_text(call: ast.Call) -> str | None:
    for keyword in call.keywords:
        if keyword.arg == "metadata" and isinstance(keyword.value, ast.Dict):
            for key, item in zip(keyword.value.keys, keyword.value.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "help" and isinstance(item, ast.Constant):
                    return item.value if isinstance(item.value, str) else None
    return None


def _default_source(call: ast.Call) -> str | None:
    """The source of the field's default: ``default=X`` -> ``X``; ``default_factory=lambda: X`` -> ``X``."""
    for keyword in call.keywords:
        if keyword.arg == "default":
            return ast.unparse(keyword.value)
        if keyword.arg == "default_factory":
            factory = keyword.value
            return ast.unparse(factory.body) if isinstance(factory, ast.Lambda) else f"{ast.unparse(factory)}()"
    return None


def plain_roles(text: str) -> str:
    """``:class:`~a.b.C``` -> ```C```; ``:mod:`a.b``` -> ```a.b```."""
    text = _ROLE_SHORT.sub(lambda m: f"`{m[1].rsplit('.', 1)[-1]}`", text)
    return _ROLE_FULL.sub(lambda m: f"`{m[1]}`", text)


class FieldHelp(griffe.Extension):
    """See the module docstring."""

    def on_attribute_instance(self, *, node: Any, attr: griffe.Attribute, agent: Any, **kwargs: Any) -> None:
        call = _field_call(node.value) if isinstance(node, ast.AnnAssign) else None
        if call is None:
            return
        text = _help_text(call)
        if text and attr.docstring is None:
            attr.docstring = griffe.Docstring(text, parent=attr)
        default = _default_source(call)
        if default is not None:
            attr.value = default  # read by griffe's dataclass extension as the __init__ default too

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = plain_roles(obj.docstring.value)
