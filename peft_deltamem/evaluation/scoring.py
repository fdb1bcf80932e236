"""Deprecated: moved to ``peft_deltamem.evaluation.metrics`` (this path goes away in the next release)."""

from peft_deltamem._deprecated import moved

moved(__name__, "peft_deltamem.evaluation.metrics")
