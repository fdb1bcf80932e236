"""``deltamem export-vllm``: turn a δ-mem adapter and its base model into a checkpoint vLLM serves (docs/vllm.md).

    deltamem export-vllm ./my-adapter ./my-adapter-vllm --base HuggingFaceTB/SmolLM2-135M-Instruct
    vllm serve ./my-adapter-vllm --no-enable-prefix-caching \\
        --kv-transfer-config '{"kv_connector": "DeltaMemConnector", \\
                               "kv_connector_module_path": "peft_deltamem.vllm.connector", "kv_role": "kv_both"}'

vLLM is not needed to export; serving needs ``pip install "peft-deltamem[vllm]"`` (the plugin registers itself).
"""

from __future__ import annotations

import argparse
import sys

from ._args import ArgumentParser, add_conversion_arguments


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``deltamem export-vllm``."""
    parser = ArgumentParser(
        prog="deltamem export-vllm",
        description="Write a checkpoint vLLM serves with the δ-mem plugin: the base model's weights plus the adapter's.",
    )
    add_conversion_arguments(
        parser,
        ("adapter", "δ-mem adapter directory or Hub repo id"),
        base="base model name or directory (default: the adapter's)",
        revision="Hub revision of the adapter",
        dtypes=("auto", "float32", "bfloat16", "float16"),
        dtype="dtype of the base weights in the checkpoint (the adapter stays float32)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``deltamem export-vllm``; returns the exit status (0 on success, 1 when the adapter cannot be exported)."""
    args = build_parser().parse_args(argv)
    from ..vllm.export import export_vllm_checkpoint  # torch and transformers: only once the arguments are good

    try:
        path = export_vllm_checkpoint(args.adapter, args.out, args.base, dtype=args.dtype, revision=args.revision)
    except (OSError, ValueError) as exc:
        print(f"deltamem export-vllm: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
