"""peft_deltamem: δ-mem (arXiv 2605.12357) as a PEFT method.

``import peft_deltamem`` registers the ``DELTAMEM`` PEFT type, so ``get_peft_model(model, DeltaMemConfig(...))``,
``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM`` and transformers' ``load_adapter`` work as for LoRA.
"""

from peft.utils import register_peft_method

from ._registry import DELTAMEM_PEFT_TYPE
from ._version import __version__ as __version__
from .chat.session import MemorySession
from .config import DeltaMemConfig
from .interop.convert import convert_reference_adapter, export_reference_adapter
from .layer import DeltaMemAttention
from .memory.generation import MemoryCache
from .memory.state import MemoryLayout, MemoryState
from .model import DeltaMemModel
from .ops import delta_rule_scan

__all__ = [
    "DELTAMEM_PEFT_TYPE",
    "DeltaMemAttention",
    "DeltaMemConfig",
    "DeltaMemModel",
    "MemoryCache",
    "MemoryLayout",
    "MemorySession",
    "MemoryState",
    "convert_reference_adapter",
    "delta_rule_scan",
    "export_reference_adapter",
]

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING as _TUNERS

if DELTAMEM_PEFT_TYPE not in _TUNERS:  # importlib.reload must not register twice
    register_peft_method(name="deltamem", config_cls=DeltaMemConfig, model_cls=DeltaMemModel, prefix="deltamem_")
