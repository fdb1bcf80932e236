"""Old import paths that keep working for one release: each is a tiny module that becomes its new home."""

from __future__ import annotations

import importlib
import sys
import warnings


def moved(old: str, new: str) -> None:
    """Make module ``old`` an alias of module ``new``, with a ``DeprecationWarning``; run ``new``'s ``main`` under -m.

    Called by a shim module as ``moved(__name__, "peft_deltamem.new.path")``. Under ``python -m old`` (``old`` is
    ``"__main__"``) the new module's ``main`` runs and its exit status ends the process.
    """
    target = importlib.import_module(new)
    if old == "__main__":
        warnings.warn(f"run python -m {new} instead: this path goes away in the next release", DeprecationWarning, 2)
        sys.exit(target.main())
    warnings.warn(
        f"{old} moved to {new}; the old import path goes away in the next release", DeprecationWarning, stacklevel=3
    )
    sys.modules[old] = target
