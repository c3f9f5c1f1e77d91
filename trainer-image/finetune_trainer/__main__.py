"""`python -m finetune_trainer --config <path>`: launched by torchrun in every pod."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from . import exit_codes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune_trainer", description="Run one fine-tuning job from a TrainerConfig.")
    parser.add_argument("--config", required=True, help="path of the TrainerConfig JSON document")
    parser.add_argument("--work-dir", default=None, help="local scratch folder (default: a new temporary folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from pydantic import ValidationError

    from .config import TrainerConfig

    try:
        with open(args.config) as f:
            config = TrainerConfig.from_json(f.read())
    except (OSError, ValidationError) as e:
        print(f"invalid TrainerConfig {args.config}: {e}", file=sys.stderr)
        return exit_codes.INVALID_CONFIG

    from .run import execute

    try:
        summary = execute(config, args.work_dir)
    except Exception:
        traceback.print_exc()
        return exit_codes.UNEXPECTED_ERROR
    if summary.exit_code != exit_codes.SUCCEEDED:
        print(f"{summary.result.reason}: {summary.result.message}", file=sys.stderr)
    return summary.exit_code


if __name__ == "__main__":
    from .launch import record_exit_code

    exit_code = main()
    record_exit_code(exit_code)
    sys.exit(exit_code)
