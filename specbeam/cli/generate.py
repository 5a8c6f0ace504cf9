"""Complete one prompt with a local model: the completion on stdout, a one-line summary on stderr."""
import argparse
import sys
from pathlib import Path

from specbeam.config import BEAM, GREEDY, SAMPLE
from specbeam.trace import render, to_html

from specbeam.cli.errors import CliError
from specbeam.cli.loading import add_common_arguments, encode, load_engine, load_tokenizer
from specbeam.cli.modes import DecodeMode
from specbeam.cli.runs import Run, format_acceptance, timed_generate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--trace", type=Path, default=None,
                        help="beam search: write its trace here, an interactive HTML page (a .png path: PNGs)")


def mode_from_args(args: argparse.Namespace) -> DecodeMode:
    name = SAMPLE if args.sample else BEAM if args.num_beams > 1 else GREEDY
    return DecodeMode(name, args.num_beams, args.temperature, args.top_p)


def summary(mode: DecodeMode, run: Run) -> str:
    acceptance = format_acceptance(run.stats.mean_accepted(), run.stats.acceptance_by_depth())
    return (f"{mode.label}: {len(run.tokens)} tokens in {run.seconds:.2f} s ({run.tokens_per_second:.1f} tokens/s), "
            f"{run.stats.target_passes} target passes, accepted {acceptance}")


def write_trace(run: Run, tokenizer, path: Path) -> str:
    """The run's beam trace as an HTML page, or as PNGs for a .png path; returns the (first) file."""
    if path.suffix.lower() == ".png":
        return render(run.trace, tokenizer, path=str(path))
    return to_html(run.trace, tokenizer, str(path))


def run(args: argparse.Namespace) -> int:
    mode = mode_from_args(args)
    if args.trace is not None and mode.name != BEAM:
        raise CliError("--trace draws a beam search: give --num-beams 2 or more")
    tokenizer = load_tokenizer(args)
    inputs = encode(tokenizer, args.prompt, args.device, chat=args.chat)
    _, engine = load_engine(args)
    result = timed_generate(engine.generate, inputs, mode, args.max_new_tokens, args.seed)
    print(result.text(tokenizer))
    print(summary(mode, result), file=sys.stderr)
    if args.trace is not None:
        print(f"wrote {write_trace(result, tokenizer, args.trace)}", file=sys.stderr)
    return 0
