"""Engine settings a δ-mem checkpoint needs, applied while vLLM builds its config (vLLM imported here)."""

from __future__ import annotations

import logging

from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

logger = logging.getLogger(__name__)


class DeltaMemModelConfig(VerifyAndUpdateConfig):
    """vLLM's per-architecture config hook (``MODELS_CONFIG_MAP``): prefix caching off.

    vLLM's prefix cache keys the recurrent states of a request by its tokens; a δ-mem state also depends on the
    memory the request started from, so two requests with the same tokens but different memories would share a
    state. The hook runs before vLLM's own hybrid-model setup, which then keeps the state cache in its plain
    one-slot-per-request mode.
    """

    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        cache_config = vllm_config.cache_config
        if cache_config.enable_prefix_caching:
            logger.warning(
                "δ-mem: prefix caching is turned off (a request's states depend on the memory it starts from, "
                "which the prefix cache cannot see)."
            )
            cache_config.enable_prefix_caching = False


def install_config_hooks(architectures: tuple[str, ...]) -> None:
    """Register :class:`DeltaMemModelConfig` for every δ-mem architecture."""
    for name in architectures:
        MODELS_CONFIG_MAP.setdefault(name, DeltaMemModelConfig)
