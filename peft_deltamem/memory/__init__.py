"""The memory and its lifecycle around a model call.

- :mod:`~peft_deltamem.memory.state`: :class:`MemoryState`, the memory as an explicit, saveable object;
- :mod:`~peft_deltamem.memory.context`: :class:`MemoryCallContext`, what one call hands every δ-mem layer;
- :mod:`~peft_deltamem.memory.hooks`: the model-level hooks that build the context and commit the new states;
- :mod:`~peft_deltamem.memory.checkpointing`: the memory through reentrant gradient checkpoints;
- :mod:`~peft_deltamem.memory.generation`: :class:`MemoryCache`, the memory carried through ``generate``.
"""

from .generation import MemoryCache
from .state import MemoryLayout, MemoryState

__all__ = ["MemoryCache", "MemoryLayout", "MemoryState"]
