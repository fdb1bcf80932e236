"""What a client of a δ-mem vLLM engine puts in a request, and how it gets the memory the request left.

A request names its memory in ``kv_transfer_params`` (vLLM's KV-transfer connector carries them to the workers;
the OpenAI endpoints accept and return the field too)::

    params = SamplingParams(max_tokens=64, extra_args={"kv_transfer_params": memory_request(load="s.safetensors",
                                                                                            save="s2.safetensors")})
    out = llm.generate(prompt, params)[0]
    path = wait_for_saved_memory(out.kv_transfer_params)   # the file is complete once this returns

Files are :meth:`peft_deltamem.MemoryState.save` files: the format sessions use, in both directions.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

# The vLLM release this integration is tested with (pyproject's `vllm` extra pins its CPU build).
SUPPORTED_VLLM = "0.32.0"
CONNECTOR_NAME = "DeltaMemConnector"
CONNECTOR_MODULE = "peft_deltamem.vllm.connector"

# Request keys (in kv_transfer_params).
LOAD = "deltamem_load"  # path of a MemoryState file the request starts from (default: an empty memory)
SAVE = "deltamem_save"  # where the request's final memory is written
READ_ONLY = "deltamem_read_only"  # read the memory, write nothing (every token reads the starting memory)
UNWRITTEN = "deltamem_unwritten"  # [[start, end), ...] prompt positions that are read but not written
# Reply keys (in the finished request's kv_transfer_params).
SAVED = "deltamem_saved"  # the path the final memory is (or is being) written to
SAVE_ID = "deltamem_save_id"  # the engine's id of the request, recorded in the saved file's header
STARTS = "deltamem_starts"  # how often the request started from its memory: 1 + its resumptions after preemptions
ERROR = "deltamem_error"  # why the request could not start from its memory (it ran from an empty one)
HEADER_SAVE_ID = "deltamem_vllm_request"  # the header key holding SAVE_ID in a memory saved by the engine


def memory_request(
    load: str | os.PathLike | None = None,
    save: str | os.PathLike | None = None,
    *,
    read_only: bool = False,
    unwritten: Sequence[tuple[int, int]] = (),
) -> dict[str, Any]:
    """The ``kv_transfer_params`` of a request that starts from ``load`` and leaves its memory at ``save``.

    ``read_only``: the request reads ``load`` (every token reads it as it was) and writes nothing; a server's reply.
    ``unwritten``: prompt token ranges ``[start, end)`` that are read but not written (a chat template's bos token or
    system prompt), as :func:`peft_deltamem.serving.window.write_messages` does.
    A history write is a request with the history as its prompt, ``max_tokens=1`` and ``save``.
    """
    if read_only and save is not None:
        raise ValueError("memory_request: a read-only request leaves its memory unchanged; do not ask to save it.")
    params: dict[str, Any] = {}
    if load is not None:
        params[LOAD] = os.fspath(load)
    if save is not None:
        params[SAVE] = os.fspath(save)
    if read_only:
        params[READ_ONLY] = True
    if unwritten:
        ranges = [[int(a), int(b)] for a, b in unwritten]
        if any(a < 0 or b < a for a, b in ranges):
            raise ValueError(f"memory_request: unwritten ranges must be [start, end) with 0 <= start <= end: {ranges}")
        params[UNWRITTEN] = ranges
    return params


def saved_memory_path(kv_transfer_params: Mapping[str, Any] | None) -> str | None:
    """The path a finished request's memory is written to, or None if it asked for no save."""
    if not kv_transfer_params:
        return None
    return kv_transfer_params.get(SAVED)


def wait_for_saved_memory(
    kv_transfer_params: Mapping[str, Any] | Any, timeout: float = 60.0, poll_s: float = 0.002
) -> str:
    """Block until the memory a finished request saves is complete on disk; returns its path.

    Takes a ``RequestOutput`` or its ``kv_transfer_params``. A request that ends by its length (``max_tokens``,
    e.g. every history write) is saved before vLLM hands back its answer, so this returns at once; one that ends
    on a stop token is saved by the engine's next step, a few milliseconds later. The file is written atomically and
    names the request in its header, so an older file at the same path is never taken for it.
    """
    params = getattr(kv_transfer_params, "kv_transfer_params", kv_transfer_params)
    if params and params.get(ERROR):
        raise RuntimeError(f"the request did not start from its memory: {params[ERROR]}")
    path = saved_memory_path(params)
    if path is None:
        raise ValueError("wait_for_saved_memory: the request asked for no save (no 'deltamem_save' in its params).")
    want = str(params.get(SAVE_ID, ""))
    deadline = time.monotonic() + timeout
    while True:
        if os.path.exists(path) and _saved_by(path) == want:
            return path
        if time.monotonic() > deadline:
            raise TimeoutError(f"the memory of request {want!r} did not appear at {path} within {timeout} s")
        time.sleep(poll_s)


def _saved_by(path: str) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get(HEADER_SAVE_ID)
    except Exception:  # replaced under us, or not a safetensors file: not ours (yet)
        return None


def kv_transfer_config(*, as_dict: bool = False):
    """The ``kv_transfer_config`` that attaches the δ-mem connector to an engine (``LLM(..., kv_transfer_config=...)``,
    or ``vllm serve --kv-transfer-config '<json of as_dict=True>'``)."""
    config = {"kv_connector": CONNECTOR_NAME, "kv_connector_module_path": CONNECTOR_MODULE, "kv_role": "kv_both"}
    if as_dict:
        return config
    from vllm.config import KVTransferConfig

    return KVTransferConfig(**config)
