"""`specbeam eval --cascade`: the shipped cascade (draft, mid, target) over a prompt file, greedy. Fixed two-stage
(draft -> target) and three-stage (draft -> mid -> target) speculation at a fixed depth, the adaptive cascade
(its policy picks the stages and the tree each round), and the early-exit router at several λ: tokens/s, latency
p50 / p95 / p99, accepted tokens per round, draft passes per stage, where the calls stopped, and how many outputs
are the target's own; the quality predictor's held-out calibration; a chart of agreement against p95 latency."""
import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from specbeam import Engine, RouterConfig, SpecConfig
from specbeam.assets import load_default_cascade
from specbeam.cli.loading import encode
from specbeam.cli.modes import DEFAULT_MODES
from specbeam.cli.prompts import read_prompts
from specbeam.cli.runs import Run, latency_quantiles, tokens_per_second, merge_stats, timed_generate, warm_up
from specbeam.cli.table import format_table
from specbeam.config import GREEDY
from specbeam.router import ROUTER_PATH

FIXED = SpecConfig(depth=3, adaptive=False)
LAMS = (0.0, 0.01, 0.03, 0.1, math.inf)  # the router's prices on lost quality, in seconds of a call's latency


@dataclass
class ConfigResult:
    config: str
    tokens_per_second: float
    latency_seconds: dict[str, float]
    accepted_per_round: float
    stage_passes: list[int]  # draft passes per stage, smallest first
    stopped_at: dict[str, int]  # calls answered by each stage
    agreement: int  # outputs identical to the target's own
    prompts: int

    def row(self) -> list[str]:
        latencies = (f"{seconds:.3f}" for seconds in self.latency_seconds.values())
        stopped = " / ".join(f"{self.stopped_at.get(s, 0)}" for s in ("draft", "mid", "target"))
        return [self.config, f"{self.tokens_per_second:.1f}", *latencies, f"{self.accepted_per_round:.2f}",
                " / ".join(map(str, self.stage_passes)) or "-", stopped, f"{self.agreement}/{self.prompts}"]


HEADERS = ["configuration", "tokens/s", "p50 s", "p95 s", "p99 s", "accepted/round", "passes draft / mid",
           "stopped draft / mid / target", "= target"]


def configurations(target, drafts) -> dict[str, Engine]:
    draft, _ = drafts
    engines = {"two-stage (draft, depth 3)": Engine(target, draft_model=draft, spec=FIXED),
               "three-stage (draft, mid, depth 3)": Engine(target, draft_model=drafts, spec=FIXED),
               "cascade (adaptive)": Engine(target, draft_model=drafts)}
    for lam in LAMS:
        engines[f"router λ={lam:g}"] = Engine(target, draft_model=drafts, router=RouterConfig(lam=lam))
    return engines


def evaluate(name: str, engine: Engine, encoded: list[dict], own: list[Run], max_new_tokens: int) -> ConfigResult:
    mode = DEFAULT_MODES[GREEDY]
    runs = [timed_generate(engine.generate, inputs, mode, max_new_tokens)
            for inputs in tqdm(encoded, desc=name, unit="prompt", leave=False)]
    stats = merge_stats([run.stats for run in runs])
    stages = ("draft", "mid")
    stopped = [stages[run.stats.routed_to] if run.stats.routed_to is not None else "target" for run in runs]
    return ConfigResult(
        config=name,
        tokens_per_second=tokens_per_second(runs),
        latency_seconds=latency_quantiles(runs),
        accepted_per_round=stats.mean_accepted(),
        stage_passes=stats.stage_passes or ([stats.draft_passes] if stats.draft_passes else []),
        stopped_at={stage: stopped.count(stage) for stage in set(stopped)},
        agreement=sum(run.same_tokens(reference) for run, reference in zip(runs, own)),
        prompts=len(runs),
    )


def write_chart(results: list[ConfigResult], path: Path) -> None:
    """Agreement with the target against p95 latency, one point per λ of the router."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routed = [r for r in results if r.config.startswith("router")]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r.latency_seconds["p95"] for r in routed], [r.agreement / r.prompts for r in routed], "o-")
    for r in routed:
        ax.annotate(r.config.removeprefix("router "), (r.latency_seconds["p95"], r.agreement / r.prompts))
    ax.set_xlabel("p95 latency per call (s)")
    ax.set_ylabel("outputs identical to the target's")
    ax.set_title("early-exit router: quality against latency over λ")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    target, drafts, tokenizer = load_default_cascade()
    cases = read_prompts(args.prompts)
    encoded = [encode(tokenizer, case.prompt, "cpu") for case in cases]
    own = [timed_generate(target.generate, inputs, DEFAULT_MODES[GREEDY], args.max_new_tokens) for inputs in encoded]
    results = []
    for name, engine in tqdm(configurations(target, drafts).items(), desc="configurations", unit="config"):
        warm_up(engine.generate, encoded[0], [DEFAULT_MODES[GREEDY]])
        results.append(evaluate(name, engine, encoded, own, args.max_new_tokens))
    print(format_table(HEADERS, [result.row() for result in results]))
    calibration = json.loads(ROUTER_PATH.with_name("router_metrics.json").read_text())
    print(f"quality predictor, held-out prompts: {json.dumps(calibration.get('heldout', calibration))}")
    write_chart(results, args.chart)
    print(f"chart: {args.chart}")
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(result) for result in results], indent=2) + "\n")
    return 0
