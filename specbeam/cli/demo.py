"""transformers' generate and specbeam's side by side on the shipped pair: greedy, beam search, sampling."""
import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from specbeam import Engine
from specbeam.assets import load_default_pair
from specbeam.stats import plot_acceptance
from specbeam.trace import to_html
from specbeam.trace_png import render_png

from specbeam.cli.loading import encode
from specbeam.cli.modes import DEFAULT_MODES, DecodeMode
from specbeam.cli.runs import Run, format_acceptance, timed_generate, warm_up
from specbeam.cli.table import format_table

PROMPT = '''import os


def read_lines(path):
    """Return the lines of the file at path, without their line endings."""
'''
SEED = 0
HEADERS = ["mode", "transformers s", "tokens/s", "specbeam s", "tokens/s", "speed-up", "accepted", "outputs"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("specbeam-demo"),
                        help="where the pictures go (PNGs, and the beam trace as an HTML page)")
    # the pair is tiny: a second thread costs more in synchronisation than it saves, and far more on a busy machine
    parser.set_defaults(threads=1)


@dataclass
class Comparison:
    """One mode, decoded by transformers' generate (plain: it has no assisted beam search) and by specbeam with
    the draft."""

    mode: DecodeMode
    transformers: Run
    specbeam: Run

    @property
    def identical(self) -> bool:
        return self.transformers.same_tokens(self.specbeam)

    def verdict(self) -> str:
        if not self.mode.lossless:
            return "same distribution"
        return "identical" if self.identical else "DIFFERENT"

    def row(self) -> list[str]:
        stats = self.specbeam.stats
        return [self.mode.label,
                f"{self.transformers.seconds:.2f}", f"{self.transformers.tokens_per_second:.1f}",
                f"{self.specbeam.seconds:.2f}", f"{self.specbeam.tokens_per_second:.1f}",
                f"{self.transformers.seconds / self.specbeam.seconds:.2f}x",
                format_acceptance(stats.mean_accepted(), stats.acceptance_by_depth()), self.verdict()]

    def outputs(self, tokenizer) -> str:
        """The decoded completions, once when they are identical."""
        if self.identical:
            return f"--- {self.mode.label}: transformers = specbeam ---\n{self.specbeam.text(tokenizer)}"
        return "\n".join(f"--- {self.mode.label}: {name} (seed {SEED}) ---\n{run.text(tokenizer)}"
                         for name, run in (("transformers", self.transformers), ("specbeam", self.specbeam)))


def compare(target, engine: Engine, inputs: dict, modes: list[DecodeMode], max_new_tokens: int) -> list[Comparison]:
    with tqdm(total=2 * len(modes), desc="demo", unit="run", leave=False) as bar:
        comparisons = []
        for mode in modes:
            runs = []
            for generate in (target.generate, engine.generate):
                runs.append(timed_generate(generate, inputs, mode, max_new_tokens, SEED))
                bar.update()
            comparisons.append(Comparison(mode, *runs))
    return comparisons


def write_pictures(comparisons: list[Comparison], tokenizer, out: Path) -> list[str]:
    """The beam search tree (PNGs and the interactive HTML page) and the acceptance rates by draft depth."""
    out.mkdir(parents=True, exist_ok=True)
    beam = next(c.specbeam for c in comparisons if c.specbeam.trace is not None)
    return [
        *render_png(beam.trace, str(out / "beam_tree.png"), tokenizer),
        to_html(beam.trace, tokenizer, str(out / "beam_tree.html")),
        plot_acceptance({c.mode.label: c.specbeam.stats for c in comparisons}, str(out / "acceptance.png")),
    ]


def run(args: argparse.Namespace) -> int:
    target, draft, tokenizer = load_default_pair()
    engine = Engine(target, draft_model=draft)
    inputs = encode(tokenizer, PROMPT, "cpu")
    modes = list(DEFAULT_MODES.values())
    for generate in (target.generate, engine.generate):
        warm_up(generate, inputs, modes)
    comparisons = compare(target, engine, inputs, modes, args.max_new_tokens)
    print(f"--- prompt ---\n{PROMPT}")
    for comparison in comparisons:
        print(comparison.outputs(tokenizer))
    print()
    print(format_table(HEADERS, [comparison.row() for comparison in comparisons]))
    print("\nwrote " + ", ".join(write_pictures(comparisons, tokenizer, args.out)))
    broken = [c.mode.label for c in comparisons if c.mode.lossless and not c.identical]
    if broken:
        print(f"specbeam's output differs from transformers' in: {', '.join(broken)}", file=sys.stderr)
    return 1 if broken else 0
