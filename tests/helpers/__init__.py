"""Helpers shared by the tests, imported one way: ``from tests.helpers.<module> import ...``.

``chat_fixtures``: offline tokenizers with real chat templates; ``tiny_models``: tiny random decoders built from
configs; ``recall``: recall conversations for training; ``fake_hub``: a local Hub server; ``benchmarks``: run the
scripts of ``benchmarks/``; ``distributed_worker``: the script ``torchrun`` runs in the distributed training test.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout
