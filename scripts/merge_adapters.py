#!/usr/bin/env python
"""Merge PEFT LoRA adapters (same arguments as ``poc-lora merge``).

Example:
    python scripts/merge_adapters.py runs/adapter_0 runs/adapter_1 --output runs/merged
    python scripts/merge_adapters.py runs/ --output runs/merged_svd --method svd --rank 32
"""

from __future__ import annotations

import argparse
import logging
import sys

from poc_lora.cli import add_merge_arguments, merge_namespace
from poc_lora.errors import PocLoraError
from poc_lora.merge import main_merge


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    keys = add_merge_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return main_merge(merge_namespace(keys, sys.argv[1:] if argv is None else argv))
    except PocLoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
