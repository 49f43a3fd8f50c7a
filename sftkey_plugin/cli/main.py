"""Entry point of the ``sftkey`` console script: argparse with one module per subcommand."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .data import CLIError

DESCRIPTION = """\
SFTKey (arXiv 2512.21017): chain-of-thought SFT that gives the key answer tokens extra training.

  sftkey demo                                 plain SFT vs SFTKey on a tiny model, on this CPU (< 10 min)
  sftkey preview DATA --tokenizer PATH        which tokens will be trained as the key answer
  sftkey convert IN OUT --from gsm8k          rewrite CoT data as <Thinking>...</Thinking><Answer>...</Answer>
  sftkey eval MODEL DATA                      answer accuracy and format accuracy of a model
  sftkey eval --compare A.jsonl B.jsonl       two result files side by side, with a paired bootstrap CI
  sftkey ab CONFIG --eval EVAL --out OUT      does SFTKey help on my model? arms x seeds at equal compute, a report
  sftkey train --config cfg.yaml              TRL's `trl sft` with the sftkey_* keys (--help lists every key)
"""


def build_parser() -> argparse.ArgumentParser:
    """The parser with every subcommand registered."""
    from . import ab, convert, demo, evaluate, preview, train

    parser = argparse.ArgumentParser(
        prog="sftkey", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"sftkey {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (preview, convert, evaluate, demo, train, ab):
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; 0 success, 1 a check failed (``--min-found``), 2 bad input (SFTKEY_DEBUG=1: traceback)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the CLI tokenises in one process; avoid fork warnings
    parser = build_parser()
    # `train` forwards its arguments to TrlParser unparsed; any other command with arguments left is an error
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "forwards_argv", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, OSError) as error:
        if os.environ.get("SFTKEY_DEBUG"):
            raise
        print(f"sftkey {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sftkey {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
