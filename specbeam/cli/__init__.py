"""The `specbeam` console script: `demo`, `generate`, `eval` and `serve`."""
import argparse
import sys

import torch

from specbeam.cli import demo, evaluate, generate, serve
from specbeam.cli.errors import CliError

COMMANDS = {"demo": demo, "generate": generate, "eval": evaluate, "serve": serve}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specbeam", description="Lossless speculative decoding for HF causal LMs.")
    subcommands = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        sub = subcommands.add_parser(name, help=module.__doc__, description=module.__doc__)
        sub.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand; returns its exit status: 1, with the message on stderr, for a CliError or for a
    ValueError, which is how specbeam and transformers refuse bad generation arguments before any work."""
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return args.run(args)
    except (CliError, ValueError) as error:
        print(f"specbeam {args.command}: error: {error}", file=sys.stderr)
        return 1
