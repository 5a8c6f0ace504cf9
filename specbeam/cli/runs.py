"""Timing one `generate` call, transformers' or specbeam's, and what it returns."""
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from specbeam.stats import DecodeStats
from specbeam.trace import Trace

from specbeam.cli.modes import DecodeMode

QUANTILES = (0.5, 0.95, 0.99)  # of per-call latency


def tokens_per_second(runs: list["Run"]) -> float:
    """New tokens over seconds, over all the runs."""
    return sum(len(run.tokens) for run in runs) / sum(run.seconds for run in runs)


def latency_quantiles(runs: list["Run"]) -> dict[str, float]:
    """p50, p95, p99 of the runs' seconds."""
    seconds = torch.tensor([run.seconds for run in runs], dtype=torch.float64)
    return {f"p{round(q * 100)}": float(seconds.quantile(q)) for q in QUANTILES}


@dataclass
class Run:
    """One prompt decoded once; `stats` and `trace` come from specbeam only (`trace` from beam search only)."""

    tokens: torch.Tensor  # [new_tokens] the first returned sequence past the prompt
    seconds: float
    stats: DecodeStats | None = None
    trace: Trace | None = field(default=None, repr=False)

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds

    def same_tokens(self, other: "Run") -> bool:
        return torch.equal(self.tokens.cpu(), other.tokens.cpu())

    def text(self, tokenizer) -> str:
        return tokenizer.decode(self.tokens, skip_special_tokens=True)


def timed_generate(
    generate: Callable, inputs: dict[str, torch.Tensor], mode: DecodeMode, max_new_tokens: int, seed: int = 0
) -> Run:
    """Calls `generate` (a model's or an `Engine`'s) on one prompt; the global seed is set first, so that
    transformers' sampling is reproducible (specbeam samples from the same global generator)."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    out = generate(**inputs, **mode.generate_kwargs(), max_new_tokens=max_new_tokens, return_dict_in_generate=True)
    if out.sequences.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:]
    return Run(tokens, seconds, getattr(out, "stats", None), getattr(out, "trace", None))


def warm_up(generate: Callable, inputs: dict[str, torch.Tensor], modes: list[DecodeMode]) -> None:
    """Two tokens in every mode, so that first-call costs (allocation, lazy imports) stay out of the timings."""
    for mode in modes:
        timed_generate(generate, inputs, mode, max_new_tokens=2)


def merge_stats(stats: list[DecodeStats]) -> DecodeStats:
    """The counts of several calls added up, so that rates are over all their rounds."""
    total = DecodeStats()
    for s in stats:
        total.add(s)
        total.kv_blocks_peak = max(total.kv_blocks_peak, s.kv_blocks_peak)
        total.kv_bytes_peak = max(total.kv_bytes_peak, s.kv_bytes_peak)
    return total


def format_acceptance(mean_accepted: float, by_depth: list[float]) -> str:
    """'2.05/round (1.00 0.52 0.33 0.19)': drafted tokens accepted per round, then the rate at each depth."""
    if not by_depth:
        return "nothing drafted"
    return f"{mean_accepted:.2f}/round ({' '.join(f'{rate:.2f}' for rate in by_depth)})"
