"""Train one TRL recipe: ``sftkey train`` (``sftkey_plugin/cli/train.py``), TRL's ``trl/scripts/sft.py`` with
``SFTKeyConfig`` and ``SFTKeyTrainer``; kept so that the commands below work from a checkout.

    python recipes/trl/train.py --config recipes/trl/gsm8k/qwen2.5-1.5b_lora_finder_sftkey.yaml
    accelerate launch --config_file recipes/trl/accelerate/fsdp2_8gpu.yaml recipes/trl/train.py --config RECIPE.yaml

The same as ``sftkey train --config RECIPE.yaml`` and ``accelerate launch ... -m sftkey_plugin.cli.train --config
RECIPE.yaml``. Any key can be overridden on the command line (``--output_dir out --max_steps 10``).
"""

from __future__ import annotations

import sys

from sftkey_plugin.cli.train import load_data, main, make_parser, train

__all__ = ["load_data", "main", "make_parser", "train"]

if __name__ == "__main__":
    sys.exit(main(prog="recipes/trl/train.py"))
