"""`python -m synthvlm.train --config-json ... --datasets-json ... --output-dir ...`: one train() call.

What torchrun starts once per GPU, and what every pod of a multi-node TrainJob or PyTorchJob runs.
"""

from __future__ import annotations

import argparse
import sys

from synthvlm.errors import SynthVLMError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m synthvlm.train", description=__doc__)
    parser.add_argument("--config-json", required=True, help="TrainConfig as JSON")
    parser.add_argument("--datasets-json", required=True, help="JSON list of datasets")
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)

    from synthvlm.kfp_support import setup_logging
    from synthvlm.stages.train import TrainConfig, parse_datasets, train

    setup_logging()
    try:
        config = TrainConfig.model_validate_json(args.config_json)
        print(train(config, parse_datasets(args.datasets_json), args.output_dir))
    except SynthVLMError as exc:
        print(f"synthvlm.train: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
