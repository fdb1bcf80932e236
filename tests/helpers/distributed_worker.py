"""Run under ``torchrun`` by test_training_distributed: train from a recipe, then save this rank's adapter weights.

Usage: ``torchrun --nproc_per_node 2 tests/helpers/distributed_worker.py OUT_DIR RECIPE.yaml [--key value ...]``.
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file

from peft_deltamem.training.recipe import parse_recipe, run


def main() -> None:
    torch.set_num_threads(1)  # two processes share the cores
    out_dir, argv = sys.argv[1], sys.argv[2:]
    trainer = run(parse_recipe(argv))
    weights = {n: p.detach().contiguous() for n, p in trainer.model.named_parameters() if "deltamem_" in n}
    save_file(weights, f"{out_dir}/rank{trainer.args.process_index}.safetensors")
    # Leave the process group in order before the interpreter exits: torn down implicitly, gloo's threads can be
    # destroyed while still joinable, and the process aborts ("terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
