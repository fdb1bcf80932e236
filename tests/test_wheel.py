"""The wheel `python -m build` makes works installed on its own: `deltamem demo --help` runs and finds its recipe.

Offline: the wheel goes into a fresh venv with ``--no-deps``; a ``.pth`` file makes this environment's installed
dependencies visible there, and neither the checkout nor this environment's editable ``peft_deltamem`` is on its path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("pip", path=str(Path(sys.executable).parent)) is None, reason="needs pip"),
]


def _run(command: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the wheel built from this checkout; returns its bin directory."""
    pytest.importorskip("build")
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a clean copy: no stale build/ or egg-info of the checkout ends up in the wheel
    shutil.copytree(ROOT / "peft_deltamem", source / "peft_deltamem", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp / "dist")], cwd=source)
    (wheel,) = (tmp / "dist").glob("peft_deltamem-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    python = venv / "bin" / "python"
    site = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip()
    )
    # This environment's dependencies (torch, transformers, peft, ...), without the checkout or its editable install.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        cwd=tmp,
    )
    return venv / "bin"


def test_deltamem_demo_help_runs_from_the_installed_wheel(installed, tmp_path) -> None:
    result = _run([str(installed / "deltamem"), "demo", "--help"], cwd=tmp_path)
    assert "usage: deltamem demo" in result.stdout and "--recipe" in result.stdout


def test_the_installed_package_finds_its_default_recipe(installed, tmp_path) -> None:
    code = (
        "import peft_deltamem, sys; from peft_deltamem.training.timed import DEFAULT_RECIPE, load_recipe; "
        "from peft_deltamem.training.recipe import recipe_file; "
        "print(peft_deltamem.__file__); print(DEFAULT_RECIPE); print(DEFAULT_RECIPE.is_file()); "
        "print(recipe_file('recipes/qwen3-8b/msw.yaml').is_file()); print(load_recipe(DEFAULT_RECIPE).adapter.r)"
    )
    package, recipe, exists, named, rank = _run([str(installed / "python"), "-c", code], cwd=tmp_path).stdout.split()
    venv = installed.parent
    assert Path(package).is_relative_to(venv) and not Path(package).is_relative_to(ROOT)
    assert Path(recipe).is_relative_to(venv) and exists == "True" and named == "True" and int(rank) > 0


def test_the_installed_package_ships_the_fused_sources(installed, tmp_path) -> None:
    """enable_fused_decode() and enable_fused_scan() build from C++ files inside the package: the wheel must carry
    them."""
    code = (
        "from peft_deltamem.ops import fused\n"
        "for op in (fused._DECODE, fused._SCAN): print(op.source, op.source.is_file())"
    )
    words = _run([str(installed / "python"), "-c", code], cwd=tmp_path).stdout.split()
    assert len(words) == 4
    for source, exists in zip(words[::2], words[1::2], strict=True):
        assert Path(source).is_relative_to(installed.parent) and exists == "True"
