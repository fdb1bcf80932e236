"""``deltamem serve``: an OpenAI-compatible chat server in which every session keeps its own δ-mem memory.

- :mod:`~peft_deltamem.serving.window`: the prompt window and the write groups (shared with ``MemorySession``);
- :mod:`~peft_deltamem.serving.store`: :class:`SessionStore`, sessions in SQLite (transcript hash chain, snapshots);
- :mod:`~peft_deltamem.serving.engine`: the :class:`Engine` interface and :class:`TransformersEngine` (batching);
- :mod:`~peft_deltamem.serving.writes`: the write groups of several sessions in one forward (batched writes);
- :mod:`~peft_deltamem.serving.app`: the FastAPI app (:func:`create_app`); :mod:`~peft_deltamem.serving.schemas`
  its request and response bodies, :mod:`~peft_deltamem.serving.openapi` their OpenAPI description;
  :mod:`~peft_deltamem.serving.metrics` its Prometheus metrics.

Only :mod:`~peft_deltamem.serving.window` and :mod:`~peft_deltamem.serving.store` work without the ``serve`` extra
(``pip install "peft-deltamem[serve]"``); this package imports nothing until used.
"""
