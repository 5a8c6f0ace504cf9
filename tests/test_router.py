"""The early-exit router's pieces: features on hand-made logits, the quality predictor, its file, its configuration,
and the calibration measures it is judged by."""
import math

import pytest
import torch
from safetensors.torch import save_file
from scipy.stats import mannwhitneyu

from specbeam.calibration import expected_calibration_error, roc_auc
from specbeam.router import (
    ACCEPTANCE_WINDOW, ENTROPY_WINDOW, FEATURES, QualityPredictor, RecentAcceptance, RouterConfig, last_kl,
    mean_entropy, router_features,
)

QUARTERS = torch.tensor([0.0, math.log(3)])  # softmax = [1/4, 3/4]
HALVES = torch.tensor([0.0, 0.0])  # softmax = [1/2, 1/2]
SURE = torch.tensor([100.0, -100.0])  # softmax ~ [1, 0]


# ---------------------------------------------------------------- features

def test_entropy_by_hand():
    h_quarters = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert mean_entropy(QUARTERS[None]) == pytest.approx(h_quarters)
    assert mean_entropy(torch.stack([HALVES, SURE])) == pytest.approx(math.log(2) / 2)
    assert mean_entropy(torch.zeros(3, 4096)) == pytest.approx(math.log(4096))  # uniform: log V


def test_entropy_reads_only_the_last_positions():
    logits = torch.cat([HALVES.expand(8, 2), SURE.expand(ENTROPY_WINDOW, 2)])
    assert mean_entropy(logits) == pytest.approx(0.0, abs=1e-60)


def test_kl_by_hand_at_the_last_position():
    upper, stage = torch.stack([HALVES, QUARTERS]), torch.stack([SURE, HALVES])  # the first position is ignored
    assert last_kl(upper, stage) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    assert last_kl(stage, stage) == 0.0


def test_recent_acceptance_starts_at_the_prior_and_forgets():
    recent = RecentAcceptance(alpha=2.0, beta=6.0)
    assert recent.value == pytest.approx(0.25)
    recent.extend([True, True, False])
    assert recent.value == pytest.approx((2 + 2) / (3 + 8))
    recent.extend([False] * ACCEPTANCE_WINDOW)  # the three first ones drop out of the window
    assert recent.value == pytest.approx(2 / (ACCEPTANCE_WINDOW + 8))


def test_router_features_in_order():
    stage, upper = torch.stack([SURE, HALVES]), torch.stack([SURE, QUARTERS])
    features = router_features(stage, upper, context_length=30, max_length=120, acceptance=0.7)
    expected = [math.log(2) / 2, 0.25, last_kl(upper, stage), 0.7]
    assert features.dtype == torch.float32 and features.shape == (len(FEATURES),)
    assert features.tolist() == pytest.approx(expected)


@pytest.mark.parametrize(
    "stage, upper, context_length, max_length, name",
    [(torch.zeros(2, 3), torch.zeros(2, 4), 2, 5, "stage_logits and upper_logits"),
     (torch.zeros(3), torch.zeros(3), 2, 5, "stage_logits and upper_logits"),
     (torch.zeros(0, 3), torch.zeros(0, 3), 2, 5, "stage_logits and upper_logits"),
     (torch.zeros(2, 3), torch.zeros(2, 3), 6, 5, "context_length <= max_length"),
     (torch.zeros(2, 3), torch.zeros(2, 3), 0, 5, "0 < context_length")],
)
def test_router_features_bad_input(stage, upper, context_length, max_length, name):
    with pytest.raises(ValueError, match=name):
        router_features(stage, upper, context_length, max_length, 0.5)


# ---------------------------------------------------------------- the predictor

@pytest.fixture
def predictor() -> QualityPredictor:
    torch.manual_seed(0)
    model = QualityPredictor()
    model.standardise_on(torch.rand(50, len(FEATURES)) * torch.tensor([8.0, 1.0, 3.0, 1.0]))
    return model.eval()


def test_predictions_are_probabilities_one_per_row(predictor):
    features = torch.randn(7, len(FEATURES)) * 10
    probs = predictor.predict(features)
    assert probs.shape == (7,) and torch.all((probs > 0) & (probs < 1))
    with pytest.raises(ValueError, match="features must be"):
        predictor.predict(features[0])


def test_save_and_load_round_trip_exactly(predictor, tmp_path):
    predictor.save(tmp_path / "router.safetensors")
    loaded = QualityPredictor.load(tmp_path / "router.safetensors")
    assert predictor.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(a, loaded.state_dict()[k]) for k, a in predictor.state_dict().items())
    features = torch.randn(5, len(FEATURES))
    assert torch.equal(predictor.predict(features), loaded.predict(features))
    assert (tmp_path / "router.safetensors").stat().st_size < 200_000


def test_load_refuses_a_file_of_other_features(predictor, tmp_path):
    save_file(dict(predictor.state_dict()), tmp_path / "other.safetensors", metadata={"features": "entropy,kl"})
    with pytest.raises(ValueError, match="features"):
        QualityPredictor.load(tmp_path / "other.safetensors")


def test_the_shipped_predictor_loads_and_predicts():
    probs = QualityPredictor.load().predict(torch.tensor([[3.0, 0.5, 0.3, 0.7]]))
    assert probs.shape == (1,) and 0 < probs.item() < 1


# ---------------------------------------------------------------- configuration

def test_router_config_accepts_lam_budget_or_both():
    assert RouterConfig(lam=0.0).lam == 0.0
    assert RouterConfig(lam=math.inf).lam == math.inf
    assert RouterConfig(latency_budget=2.5, quantile=0.99).latency_budget == 2.5
    assert RouterConfig(lam=3.0, latency_budget=2.5).quantile == 0.95


def test_router_config_resolves_lam_to_the_smaller_of_lam_and_the_budget_s():
    rows, C = torch.tensor([[0.5, 1.0], [0.9, 1.0]]), torch.tensor([1.0, 4.0])
    # stop at 0 costs 1 + λ (1 - p): the rows go on past λ = 8 and λ = 40; a budget of 1 keeps both at stage 0
    assert RouterConfig(latency_budget=1.0, quantile=1.0).resolve_lam(rows, C) == pytest.approx(8.0)
    assert RouterConfig(lam=3.0, latency_budget=1.0, quantile=1.0).resolve_lam(rows, C) == 3.0
    assert RouterConfig(lam=30.0, latency_budget=1.0, quantile=1.0).resolve_lam(rows, C) == pytest.approx(8.0)
    assert RouterConfig(lam=math.inf).resolve_lam(rows, C) == math.inf
    assert RouterConfig(lam=2.0, latency_budget=5.0).resolve_lam(rows, C) == 2.0  # the budget allows inf


@pytest.mark.parametrize(
    "kwargs, name",
    [({}, "lam or latency_budget"), ({"lam": -1.0}, "lam"), ({"lam": math.nan}, "lam"), ({"lam": "1"}, "lam"),
     ({"latency_budget": 0.0}, "latency_budget"), ({"latency_budget": math.inf}, "latency_budget"),
     ({"latency_budget": -2.0}, "latency_budget"), ({"lam": 1.0, "quantile": 0.0}, "quantile"),
     ({"lam": 1.0, "quantile": 1.5}, "quantile")],
)
def test_router_config_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RouterConfig(**kwargs)


# ---------------------------------------------------------------- calibration

def test_ece_by_hand():
    probs = torch.tensor([0.05, 0.15, 0.85, 0.95])
    assert expected_calibration_error(probs, torch.tensor([0.0, 0.0, 1.0, 1.0])) == pytest.approx(0.1)
    # bins of width 0.5: [0.05, 0.15] vs outcomes mean 0.5 -> gap 0.4; [0.85, 0.95] vs 1 -> gap 0.1
    outcomes = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert expected_calibration_error(probs, outcomes, bins=2) == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)
    assert expected_calibration_error(torch.tensor([1.0, 0.3]), torch.tensor([1.0, 0.3])) == pytest.approx(0.0)


def test_auc_by_hand_and_against_mann_whitney():
    assert roc_auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert roc_auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([1, 1, 0, 0])) == 0.0
    assert roc_auc(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == 0.5  # a tie counts one half
    # pairs (pos, neg): (0.4, 0.1) win, (0.4, 0.6) loss, (0.7, 0.1) win, (0.7, 0.6) win -> 3 / 4
    assert roc_auc(torch.tensor([0.1, 0.4, 0.6, 0.7]), torch.tensor([0, 1, 0, 1])) == pytest.approx(0.75)
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 20, (300,), generator=gen).double()  # many ties
    labels = torch.rand(300, generator=gen) < 0.3 + scores / 40
    u = mannwhitneyu(scores[labels].numpy(), scores[~labels].numpy()).statistic
    assert roc_auc(scores, labels) == pytest.approx(u / (labels.sum().item() * (~labels).sum().item()))


@pytest.mark.parametrize(
    "fn, a, b, name",
    [(roc_auc, torch.tensor([0.1, 0.2]), torch.tensor([1, 1]), "one positive and one negative"),
     (roc_auc, torch.tensor([0.1, 0.2]), torch.tensor([1, 2]), "0 or 1"),
     (roc_auc, torch.tensor([0.1]), torch.tensor([1, 0]), "1-D tensors of one length"),
     (expected_calibration_error, torch.tensor([1.5]), torch.tensor([1.0]), r"\[0, 1\]"),
     (expected_calibration_error, torch.tensor([]), torch.tensor([]), "non-empty")],
)
def test_calibration_bad_input(fn, a, b, name):
    with pytest.raises(ValueError, match=name):
        fn(a, b)
