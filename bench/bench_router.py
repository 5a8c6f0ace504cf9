"""The router's quality predictor: one prediction (the shipped MLP on one request's features) must take at most
0.3 ms on the CPU; reading the features off a context's logits is timed beside it."""
import torch

from specbeam.router import FEATURES, QualityPredictor, RecentAcceptance, router_features

BUDGET_S = 0.3e-3
VOCAB = 4096  # the shipped pair's


def test_predict_one(benchmark):
    torch.set_num_threads(1)
    predictor = QualityPredictor.load()
    features = torch.rand(1, len(FEATURES))
    benchmark.group = "router"
    probs = benchmark.pedantic(predictor.predict, (features,), warmup_rounds=10, rounds=1000)
    assert probs.shape == (1,)
    benchmark.extra_info["ms_per_prediction"] = 1e3 * benchmark.stats.stats.median
    assert benchmark.stats.stats.median <= BUDGET_S


def test_features_and_predict_one(benchmark):
    torch.set_num_threads(1)
    predictor = QualityPredictor.load()
    stage, upper = torch.randn(32, VOCAB), torch.randn(32, VOCAB)  # [positions, vocab]: the context's last 32
    recent = RecentAcceptance()
    recent.extend([True, False] * 50)

    def route() -> torch.Tensor:  # [1]
        return predictor.predict(router_features(stage, upper, 100, 132, recent.value)[None])

    benchmark.group = "router"
    benchmark.pedantic(route, warmup_rounds=5, rounds=200)
    benchmark.extra_info["ms_per_request"] = 1e3 * benchmark.stats.stats.median
