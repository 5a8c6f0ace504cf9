"""The opt-in early-exit router (lossy, `Engine(..., router=RouterConfig(...))`): a `generate` call may be answered
by one of the cascade's drafts instead of the target, when the optimal-stopping DP says that the expected loss
of quality is worth less than the time going on would take.

At a call's start, for each prompt, the quality predictor (`specbeam.router`) estimates each draft stage's
acceptance p_s from the prompt (the stage's entropy over its last positions, the prompt's share of max_length,
the KL from the stage above at the last position, and the prior acceptance); the target's is 1. The costs are
seconds, measured: L_k = the stage's seconds per requested new token (the config's quantile over its last
RATE_WINDOW calls, each stage timed on the first call's prompt and new tokens first) x the call's new tokens, made
non-decreasing in k, and C_k = L_k - L_{k-1}, so that stopping at k costs sum(C[:k+1]) = L_k, the call's
latency there. The call stops at the latest stage that any of its prompts' `optimal_cut(p, C, λ)` asks for (λ
from the config: `lam`, or the largest that keeps `latency_budget`); a draft stage answers with its own
decoding, sped up by the drafts below it. With λ = inf every call goes to the target: exactly the lossless
cascade."""
import threading
from collections import deque

import numpy as np
import torch

from specbeam.cache import BlockTable
from specbeam.model_runner import ModelRunner, Work
from specbeam.optimal_stopping import optimal_cut
from specbeam.router import ENTROPY_WINDOW, QualityPredictor, RecentAcceptance, RouterConfig, router_features

RATE_WINDOW = 32  # a stage's recent calls whose seconds per new token price a stop there
CALIBRATION_TOKENS = 64  # new tokens at most of the calls that time each stage before the first routed call
SCRATCH_BLOCK = 16  # KV slots per block of the scratch cache a prompt's features are read on


class Router:
    def __init__(self, config: RouterConfig, runners: list[ModelRunner], predictor: QualityPredictor | None = None):
        """runners: the cascade's draft stages' model runners, smallest first, then the target's (the engine's
        own: the router reads the stages' logits over a prompt through them, on a scratch cache of its own)."""
        if not isinstance(config, RouterConfig):
            raise TypeError(f"router must be a RouterConfig, got {type(config).__name__}")
        self.config, self.runners, self.models = config, runners, [runner.model for runner in runners]
        self.predictor = predictor or QualityPredictor.load()
        self.rates = [deque(maxlen=RATE_WINDOW) for _ in self.models]  # per stage: seconds per new token of calls
        self.engines: dict[int, object] = {}
        self.lock = threading.Lock()

    @property
    def calibrated(self) -> bool:
        return all(self.rates)

    def record(self, stage: int | None, seconds: float, new_tokens: int) -> None:
        """A call that `stage` (None: the target) answered in `seconds`, asked for `new_tokens` new tokens."""
        self.rates[len(self.models) - 1 if stage is None else stage].append(seconds / new_tokens)

    def stop_costs(self, new_tokens: int) -> torch.Tensor:  # [stages] float64 seconds
        """C with sum(C[:k+1]) = L_k, the seconds a call of new_tokens takes when stage k answers it (the
        quantile of the stage's recent seconds per token, times new_tokens; at least the stages' below)."""
        quantile = self.config.quantile
        latency = torch.tensor([float(np.quantile(list(r), quantile)) * new_tokens for r in self.rates])
        return torch.diff(latency.cummax(0).values, prepend=torch.zeros(1, dtype=latency.dtype)).double()

    @torch.no_grad()
    def route(self, prompts: list[torch.Tensor], max_length: int) -> int | None:
        """The draft stage that answers a call with these prompts (each [length], unpadded), or None: the target.
        A budget that no stop keeps sends the call to the quickest stop, stage 0."""
        p_rows = torch.stack([self._acceptance(prompt, max_length) for prompt in prompts])  # [prompts, stages]
        costs = self.stop_costs(max_length - max(len(p) for p in prompts))
        if self.config.latency_budget is not None and self.config.latency_budget < costs[0].item():
            return 0
        lam = self.config.resolve_lam(p_rows, costs)
        stage = max(optimal_cut(row, costs, lam) for row in p_rows)
        return None if stage == len(self.models) - 1 else stage

    def _acceptance(self, prompt: torch.Tensor, max_length: int) -> torch.Tensor:  # prompt: [length] -> [stages]
        """Each draft stage's predicted acceptance, then the target's, 1."""
        logits = [_last_logits(runner, prompt.tolist()) for runner in self.runners]  # each [positions, vocab]
        prior = RecentAcceptance().value
        features = torch.stack([router_features(logits[s], logits[s + 1], len(prompt), max_length, prior)
                                for s in range(len(self.models) - 1)])
        return torch.cat([self.predictor.predict(features).double(), torch.ones(1, dtype=torch.float64)])

    def engine(self, stage: int, make):
        """The engine that decodes with draft `stage` as its target (`make(model, drafts)` builds it), kept."""
        with self.lock:
            if stage not in self.engines:
                drafts = self.models[:stage]
                self.engines[stage] = make(self.models[stage], drafts[0] if len(drafts) == 1 else drafts or None)
            return self.engines[stage]


def _last_logits(runner: ModelRunner, tokens: list[int]) -> torch.Tensor:  # [min(ENTROPY_WINDOW, n), vocab]
    """A model's logits at the last ENTROPY_WINDOW positions of `tokens`: one prefill through the lean decoder on
    a scratch cache (it shares nothing with the engine loop's forwards); a model without one runs its own forward
    (specbeam's attention hook is set per forward on the model's config, which the thread stepping the engine may
    be using)."""
    if runner.lean is None:
        return runner.model(input_ids=torch.tensor([tokens], device=runner.device)).logits[0, -ENTROPY_WINDOW:]
    cache = runner.new_cache(-(-len(tokens) // SCRATCH_BLOCK), SCRATCH_BLOCK)
    return runner.forward(cache, [Work(BlockTable(), tokens, num_logits=min(ENTROPY_WINDOW, len(tokens)))])
