"""The opt-in early-exit router: its configuration, the features it reads off a request, and the quality
predictor, a small MLP that estimates a stage's acceptance from them.

The router decides at a point of a request (its start, or after some generated tokens); the context is the
prompt plus the tokens generated so far. For a stage s with the stage above it u (the next larger draft, or
the target) the features are

    entropy      mean over the context's last 32 positions of H(P_s) = -sum_v P_s(v) log P_s(v)
    length       context length / max length (the request's max_length: prompt plus max_new_tokens)
    kl           KL(P_u || P_s) = sum_v P_u(v) (log P_u(v) - log P_s(v)) at the context's last position
    acceptance   the running acceptance of s over the last 100 generated tokens (a token counts as accepted
                 when it is s's argmax at its parent), Beta-shrunk: at the start of a request, the prior mean

P_s, P_u are the stages' next-token distributions (softmax of their logits). The predictor maps them to the
rate at which s's greedy tokens will be accepted over the next tokens; `scripts/train_router.py` trains it on
the shipped pair.
"""
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from specbeam.optimal_stopping import lambda_for_budget, shrink_acceptance

FEATURES = ("entropy", "length", "kl", "acceptance")
ENTROPY_WINDOW = 32  # context positions averaged for the entropy
ACCEPTANCE_WINDOW = 100  # tokens the running acceptance remembers
ROUTER_PATH = Path(__file__).parent / "assets" / "router.safetensors"


@dataclass(frozen=True)
class RouterConfig:
    """Turns on the lossy early exit: a request may stop at an intermediate stage and answer with its output.

    The stage costs are measured seconds (`specbeam.engine.routing`). lam: the price of expected quality loss,
    in seconds of a call's latency (inf: never stop early, the lossless cascade). latency_budget: seconds that
    the `quantile` of calls must stay within; λ is then the largest that keeps it (`lambda_for_budget`; a
    budget no stop keeps sends calls to the quickest, the smallest draft). Give at least one; with both, the
    smaller λ rules, so the budget is kept and no call pays more than lam would have it pay."""

    lam: float | None = None
    latency_budget: float | None = None
    quantile: float = 0.95

    def __post_init__(self):
        if self.lam is None and self.latency_budget is None:
            raise ValueError("RouterConfig needs lam or latency_budget (or both); give neither for no router")
        if self.lam is not None and not (isinstance(self.lam, (int, float)) and self.lam >= 0):
            raise ValueError(f"lam must be a number >= 0 (inf: never stop early), got {self.lam!r}")
        if self.latency_budget is not None and not (
            isinstance(self.latency_budget, (int, float)) and 0 < self.latency_budget < math.inf
        ):
            raise ValueError(f"latency_budget must be a finite number > 0, got {self.latency_budget!r}")
        if not (isinstance(self.quantile, (int, float)) and 0 < self.quantile <= 1):
            raise ValueError(f"quantile must lie in (0, 1], got {self.quantile!r}")

    def resolve_lam(
        self,
        p_rows: torch.Tensor,  # [R, n] predicted stage acceptances, one row per request
        C: torch.Tensor,  # [n] stage costs
    ) -> float:
        """The λ to route these requests with: lam, the largest λ that keeps the budget, or the smaller of both."""
        lams = [] if self.lam is None else [float(self.lam)]
        if self.latency_budget is not None:
            lams.append(lambda_for_budget(p_rows, C, self.latency_budget, self.quantile))
        return min(lams)


# ---------------------------------------------------------------- features

def mean_entropy(logits: torch.Tensor) -> float:  # logits: [positions, vocab]
    """Mean over the last ENTROPY_WINDOW positions of H = -sum_v p_v log p_v, p = softmax(logits)."""
    log_p = F.log_softmax(logits[-ENTROPY_WINDOW:].float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean().item()


def last_kl(
    upper_logits: torch.Tensor,  # [positions, vocab] the stage above
    stage_logits: torch.Tensor,  # [positions, vocab]
) -> float:
    """KL(P_u || P_s) = sum_v P_u(v) (log P_u(v) - log P_s(v)) at the last position."""
    log_u = F.log_softmax(upper_logits[-1].float(), dim=-1)
    log_s = F.log_softmax(stage_logits[-1].float(), dim=-1)
    return (log_u.exp() * (log_u - log_s)).sum().item()


@dataclass
class RecentAcceptance:
    """A stage's acceptance over its last ACCEPTANCE_WINDOW tokens, shrunk by a Beta(alpha, beta) prior:
    (accepted + alpha) / (seen + alpha + beta); with nothing seen, the prior mean. The shipped predictor was
    trained with the default prior, Beta(1, 1)."""

    alpha: float = 1.0
    beta: float = 1.0
    window: deque[bool] = field(default_factory=lambda: deque(maxlen=ACCEPTANCE_WINDOW))

    def extend(self, accepted: list[bool]) -> None:
        self.window.extend(accepted)

    @property
    def value(self) -> float:
        return shrink_acceptance(sum(self.window), len(self.window), self.alpha, self.beta)


def router_features(
    stage_logits: torch.Tensor,  # [positions, vocab] the stage's logits over the context's last positions
    upper_logits: torch.Tensor,  # [positions, vocab] the stage above's, same positions
    context_length: int,
    max_length: int,
    acceptance: float,
) -> torch.Tensor:  # [len(FEATURES)] float32, in the order of FEATURES
    if stage_logits.ndim != 2 or stage_logits.shape != upper_logits.shape or stage_logits.shape[0] == 0:
        raise ValueError(f"stage_logits and upper_logits must both be [positions, vocab], got "
                         f"{tuple(stage_logits.shape)} and {tuple(upper_logits.shape)}")
    if not 0 < context_length <= max_length:
        raise ValueError(f"need 0 < context_length <= max_length, got {context_length} and {max_length}")
    values = (mean_entropy(stage_logits), context_length / max_length, last_kl(upper_logits, stage_logits), acceptance)
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------- the predictor

class QualityPredictor(torch.nn.Module):
    """features [R, F] -> standardised -> Linear(F, 256) -> ReLU -> Linear(256, 128) -> ReLU -> Linear(128, 1)
    -> sigmoid: the probability that the stage's tokens are accepted. The standardisation (mean, std per
    feature, fitted on the training set) is part of the saved state."""

    def __init__(self, num_features: int = len(FEATURES)):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(num_features, 256), torch.nn.ReLU(),
            torch.nn.Linear(256, 128), torch.nn.ReLU(),
            torch.nn.Linear(128, 1),
        )

    def standardise_on(self, features: torch.Tensor) -> None:  # features: [R, F]
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp(min=1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # features: [R, F] -> logits [R]
        return self.net((features - self.mean) / self.std).squeeze(-1)

    @torch.inference_mode()
    def predict(self, features: torch.Tensor) -> torch.Tensor:  # features: [R, F] -> probabilities [R]
        if features.ndim != 2 or features.shape[1] != self.mean.shape[0]:
            raise ValueError(f"features must be [R, {self.mean.shape[0]}], got {tuple(features.shape)}")
        return torch.sigmoid(self(features))

    def save(self, path: Path) -> None:
        state = {name: tensor.contiguous() for name, tensor in self.state_dict().items()}
        save_file(state, path, metadata={"features": ",".join(FEATURES)})

    @classmethod
    def load(cls, path: Path = ROUTER_PATH) -> "QualityPredictor":
        with safe_open(path, "pt") as f:
            features = f.metadata().get("features")
        if features != ",".join(FEATURES):
            raise ValueError(f"{path} predicts from the features {features!r}, not {','.join(FEATURES)!r}")
        state = load_file(path)
        model = cls(num_features=state["mean"].shape[0])
        model.load_state_dict(state)
        return model.eval()
