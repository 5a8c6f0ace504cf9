"""Evaluate a model (and draft) on a prompt file: speed, latency, acceptance, exact match, parity."""
import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from specbeam.assets import PAIR_DIR
from specbeam.cli.errors import CliError
from specbeam.cli.loading import add_common_arguments, encode, load_engine, load_tokenizer
from specbeam.cli.modes import DecodeMode, parse_modes
from specbeam.cli.prompts import PromptCase, read_prompts
from specbeam.cli import cascade_eval
from specbeam.cli.runs import Run, latency_quantiles, tokens_per_second, format_acceptance, merge_stats, timed_generate, warm_up
from specbeam.cli.table import format_table

SHIPPED_PROMPTS = PAIR_DIR.parent / "prompts.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, model_required=False)
    parser.add_argument("--prompts", type=Path, default=None,
                        help='JSON lines {"prompt": ..., "answer": optional} (--cascade: the shipped prompts)')
    parser.add_argument("--cascade", action="store_true",
                        help="evaluate the shipped cascade: fixed stages, the adaptive cascade, the router over λ")
    parser.add_argument("--chart", type=Path, default=Path("specbeam-cascade.png"),
                        help="--cascade: where to write the chart of agreement against latency")
    parser.add_argument("--modes", default="greedy,beam,sample",
                        help="comma-separated subset of greedy,beam,sample")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")


@dataclass
class ModeResult:
    """One decoding mode over every prompt. Counts are None where they do not apply."""

    mode: str
    prompts: int
    tokens_per_second: float
    latency_seconds: dict[str, float]  # p50, p95, p99 over prompts
    accepted_per_round: float
    acceptance_by_depth: list[float]
    exact_matches: int | None  # over the prompts with an answer
    answered: int
    equal_to_transformers: int | None  # greedy and beam only: outputs must be identical

    @classmethod
    def from_runs(cls, mode: DecodeMode, runs: list[Run], matches: list[bool], equal: list[bool] | None):
        stats = merge_stats([run.stats for run in runs])
        return cls(
            mode=mode.label,
            prompts=len(runs),
            tokens_per_second=tokens_per_second(runs),
            latency_seconds=latency_quantiles(runs),
            accepted_per_round=stats.mean_accepted(),
            acceptance_by_depth=stats.acceptance_by_depth(),
            exact_matches=sum(matches) if matches else None,
            answered=len(matches),
            equal_to_transformers=None if equal is None else sum(equal),
        )

    def row(self) -> list[str]:
        def fraction(count: int | None, total: int) -> str:
            return "n/a" if count is None else f"{count}/{total}"

        latencies = (f"{seconds:.2f}" for seconds in self.latency_seconds.values())
        return [self.mode, f"{self.tokens_per_second:.1f}", *latencies,
                format_acceptance(self.accepted_per_round, self.acceptance_by_depth),
                fraction(self.exact_matches, self.answered), fraction(self.equal_to_transformers, self.prompts)]


HEADERS = ["mode", "tokens/s", "p50 s", "p95 s", "p99 s", "accepted", "exact match", "= transformers"]


def evaluate_mode(target, engine, tokenizer, cases: list[PromptCase], encoded: list[dict], mode: DecodeMode,
                  args: argparse.Namespace) -> ModeResult:
    """specbeam on every prompt; transformers too where the outputs must be identical."""
    runs, matches, equal = [], [], []
    for case, inputs in tqdm(list(zip(cases, encoded)), desc=mode.label, unit="prompt", leave=False):
        run = timed_generate(engine.generate, inputs, mode, args.max_new_tokens, args.seed)
        runs.append(run)
        if case.answer is not None:
            matches.append(case.matches(run.text(tokenizer)))
        if mode.lossless:
            equal.append(run.same_tokens(timed_generate(target.generate, inputs, mode, args.max_new_tokens, args.seed)))
    return ModeResult.from_runs(mode, runs, matches, equal if mode.lossless else None)


def run(args: argparse.Namespace) -> int:
    if args.cascade:
        args.prompts = args.prompts or SHIPPED_PROMPTS
        return cascade_eval.run(args)
    if args.model is None or args.prompts is None:
        raise CliError("eval needs --model and --prompts (or --cascade, for the shipped cascade)")
    modes, cases = parse_modes(args.modes), read_prompts(args.prompts)
    tokenizer = load_tokenizer(args)
    encoded = [encode(tokenizer, case.prompt, args.device) for case in cases]
    target, engine = load_engine(args)
    warm_up(engine.generate, encoded[0], modes)
    results = [evaluate_mode(target, engine, tokenizer, cases, encoded, mode, args) for mode in modes]
    print(format_table(HEADERS, [result.row() for result in results]))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(result) for result in results], indent=2) + "\n")
    return 0
