"""δ-mem and the world outside: other adapter formats, the Hugging Face Hub, base models.

- :mod:`~peft_deltamem.interop.reference_format` and :mod:`~peft_deltamem.interop.convert`: the paper's adapter
  format, both ways (``deltamem convert``);
- :mod:`~peft_deltamem.interop.hub`: model cards and ``push_adapter_to_hub``;
- :mod:`~peft_deltamem.interop.base_models`: resolving base models, with the offline route for SmolLM2-135M-Instruct.
"""
