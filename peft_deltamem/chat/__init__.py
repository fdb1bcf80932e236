"""Chatting with a memory: chat-template rendering, per-token message and sentence ids, and ``MemorySession``.

- :mod:`~peft_deltamem.chat.templates`: messages to token ids, as training renders them;
- :mod:`~peft_deltamem.chat.segments`: per-token message / sentence ids from chat templates (segment writes);
- :mod:`~peft_deltamem.chat.session`: :class:`MemorySession`, a chat whose old turns live in the memory.
"""

from .segments import NOT_WRITTEN, encode_conversation
from .session import MemorySession

__all__ = ["NOT_WRITTEN", "MemorySession", "encode_conversation"]
