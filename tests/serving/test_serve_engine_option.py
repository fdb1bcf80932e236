"""``deltamem serve --engine``: the choice of engine and its one-line refusals (no model is loaded here)."""

from __future__ import annotations

import importlib.util

import pytest

from peft_deltamem.cli.serve import SetupError, build_parser, main, vllm_options


def test_the_transformers_engine_is_the_default() -> None:
    assert build_parser().parse_args(["--adapter", "a"]).engine == "transformers"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_engine_vllm_without_vllm_says_how_to_install_it(tmp_path, capsys) -> None:
    argv = ["--adapter", str(tmp_path / "adapter"), "--engine", "vllm", "--store", str(tmp_path / "s.db")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "install peft-deltamem[vllm]" in err, err
    assert not (tmp_path / "s.db").exists() and not (tmp_path / "deltamem-vllm-cache").exists()


def test_vllm_options_are_json_values_else_strings() -> None:
    options = vllm_options(["max_model_len=512", "enforce_eager=true", 'dtype="float32"', "kv_cache_dtype=auto"])
    assert options == {"max_model_len": 512, "enforce_eager": True, "dtype": "float32", "kv_cache_dtype": "auto"}
    with pytest.raises(SetupError, match="KEY=VALUE"):
        vllm_options(["max_model_len"])
