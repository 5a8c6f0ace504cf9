"""The opt-in early-exit router (lossy, `Engine(..., router=RouterConfig(...))`): a `generate` call may be answered
by one of the cascade's drafts instead of the target, when the optimal-stopping DP says that the expected loss
of quality is worth less than the cost of going on.

At a call's start, for each prompt, the quality predictor (`specbeam.router`) estimates each draft stage's
acceptance p_s from the prompt (the stage's entropy over its last positions, the prompt's share of max_length,
the KL from the stage above at the last position, and the prior acceptance); the target's is 1. Stage costs C
are parameter counts relative to the target's. The call stops at the latest stage that any of its prompts'
`optimal_cut(p, C, λ)` asks for (λ from the config: `lam`, or the largest that keeps `latency_budget`); a draft
stage answers with its own decoding, sped up by the drafts below it. With λ = inf every call goes to the
target: exactly the lossless cascade."""
import threading

import torch
from transformers import PreTrainedModel

from specbeam.optimal_stopping import optimal_cut
from specbeam.router import ENTROPY_WINDOW, QualityPredictor, RecentAcceptance, RouterConfig, router_features


class Router:
    def __init__(self, config: RouterConfig, drafts: list[PreTrainedModel], target: PreTrainedModel,
                 predictor: QualityPredictor | None = None):
        """drafts: the cascade's draft models, smallest first."""
        if not isinstance(config, RouterConfig):
            raise TypeError(f"router must be a RouterConfig, got {type(config).__name__}")
        self.config, self.models = config, [*drafts, target]
        self.predictor = predictor or QualityPredictor.load()
        total = sum(p.numel() for p in target.parameters())
        self.costs = torch.tensor([sum(p.numel() for p in m.parameters()) / total for m in self.models])
        self.engines: dict[int, object] = {}
        self.lock = threading.Lock()

    @torch.no_grad()
    def route(self, prompts: list[torch.Tensor], max_length: int) -> int | None:
        """The draft stage that answers a call with these prompts (each [length], unpadded), or None: the target."""
        p_rows = torch.stack([self._acceptance(prompt, max_length) for prompt in prompts])  # [prompts, stages]
        lam = self.config.resolve_lam(p_rows, self.costs)
        stage = max(optimal_cut(row, self.costs, lam) for row in p_rows)
        return None if stage == len(self.models) - 1 else stage

    def _acceptance(self, prompt: torch.Tensor, max_length: int) -> torch.Tensor:  # prompt: [length] -> [stages]
        """Each draft stage's predicted acceptance, then the target's, 1."""
        context = prompt[None].to(self.models[-1].device)
        logits = [m(input_ids=context).logits[0, -ENTROPY_WINDOW:] for m in self.models]  # each [positions, vocab]
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
