"""The opt-in early-exit router: with λ = inf it is exactly the lossless cascade; with λ = 0 the smallest draft
answers with its own decoding; a latency budget that every stop keeps sends calls to the target; a router
without drafts, or a bad config, is refused before any work."""
import math

import pytest
import torch

from specbeam import Engine, RouterConfig
from test_speculative import EOS_ONE, _inputs, drafts
from tiny_models import tiny_model


def _cascade(router: RouterConfig) -> Engine:
    return Engine(tiny_model("llama"), draft_model=[drafts()["unrelated"], drafts()["perturbed"]], router=router)


@pytest.mark.parametrize("mode", [dict(do_sample=False), dict(num_beams=3)], ids=["greedy", "beam3"])
def test_an_infinite_price_on_quality_is_the_lossless_cascade(mode):
    model, inputs = tiny_model("llama"), _inputs(eos=EOS_ONE)
    engine = _cascade(RouterConfig(lam=math.inf))
    out = engine.generate(**inputs, **mode, return_dict_in_generate=True)
    assert torch.equal(out.sequences, model.generate(**inputs, **mode))
    assert out.stats.routed_to is None


@pytest.mark.parametrize("mode", [dict(do_sample=False), dict(num_beams=3)], ids=["greedy", "beam3"])
def test_a_free_loss_of_quality_lets_the_smallest_draft_answer(mode):
    inputs = _inputs(eos=EOS_ONE)
    engine = _cascade(RouterConfig(lam=0.0))
    out = engine.generate(**inputs, **mode, return_dict_in_generate=True)
    assert torch.equal(out.sequences, drafts()["unrelated"].generate(**inputs, **mode))  # the draft's own output
    assert out.stats.routed_to == 0 and engine.last_stats.routed_to == 0
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks


def test_a_budget_every_stop_keeps_sends_calls_to_the_target():
    model, inputs = tiny_model("llama"), _inputs(eos=EOS_ONE)
    engine = _cascade(RouterConfig(latency_budget=10.0))  # costs are parameter shares: all stages sum to < 3
    assert torch.equal(engine.generate(**inputs), model.generate(**inputs))
    assert engine.last_stats.routed_to is None


def test_the_predicted_acceptance_decides_between_the_stages():
    engine = _cascade(RouterConfig(lam=1.0))
    prompts, max_length = [torch.tensor([5, 9, 11, 3])], 20
    p = engine.router._acceptance(prompts[0], max_length)
    assert p.shape == (3,) and p[-1] == 1 and bool(((p > 0) & (p <= 1)).all())
    costs = engine.router.costs
    # stop at k: sum(C[:k+1]) + λ (1 - prod p[:k+1]); the target carries no loss
    totals = [float(costs[:k + 1].sum() + 1.0 * (1 - p[:k + 1].prod())) for k in range(2)] + [float(costs.sum())]
    best = min(range(3), key=lambda k: (totals[k], k))
    assert engine.router.route(prompts, max_length) == (None if best == 2 else best)


def test_bad_routers_are_refused_before_any_work():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="router needs draft models"):
        Engine(model, router=RouterConfig(lam=1.0))
    with pytest.raises(ValueError, match="router needs draft models"):
        Engine(model, draft_model="ngram", router=RouterConfig(lam=1.0))
    with pytest.raises(TypeError, match="RouterConfig"):
        Engine(model, draft_model=drafts()["perturbed"], router={"lam": 1.0})
    with pytest.raises(ValueError, match="lam"):
        RouterConfig(lam=-1.0)
