"""Adds the DELTAMEM member to PEFT's `PeftType` enum.

`peft.utils.register_peft_method` only accepts names that already exist in `PeftType`, and `PeftConfig.from_pretrained`
parses `"peft_type": "DELTAMEM"` through the enum, so the member must exist before any config is built or loaded.
Python enums cannot be extended through their public API; the member is added the way `EnumType` itself builds
members, and only once per process.
"""

from __future__ import annotations

from peft.utils import PeftType


def _add_peft_type(name: str) -> PeftType:
    existing = PeftType._member_map_.get(name)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    # setattr must come before the member-map update: EnumType refuses to reassign a known member name.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


DELTAMEM_PEFT_TYPE = _add_peft_type("DELTAMEM")
"""The ``PeftType`` member of δ-mem (``PeftType.DELTAMEM``), written as ``"peft_type": "DELTAMEM"`` in adapter configs."""
