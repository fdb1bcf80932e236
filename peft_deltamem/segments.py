"""Deprecated: moved to ``peft_deltamem.chat.segments`` (this path goes away in the next release)."""

from peft_deltamem._deprecated import moved

moved(__name__, "peft_deltamem.chat.segments")
