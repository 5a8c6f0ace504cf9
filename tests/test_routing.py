"""The opt-in early-exit router: with λ = inf it is exactly the lossless cascade; with λ = 0 the smallest draft
answers with its own decoding; a latency budget that every stop keeps sends calls to the target, a tighter one
to a stop that keeps it, one that none keeps to the smallest draft; the stage costs are the seconds measured; a
router without drafts, or a bad config, is refused before any work."""
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
    engine = _cascade(RouterConfig(latency_budget=10.0))  # seconds: a call of these tiny models takes milliseconds
    assert torch.equal(engine.generate(**inputs), model.generate(**inputs))
    assert engine.last_stats.routed_to is None
    assert engine.router.calibrated and [len(r) for r in engine.router.rates] == [1, 1, 2]  # the call was timed


def _timed(engine: Engine, seconds_per_token=(0.1, 0.2, 0.4)) -> Engine:
    """The router's stages timed by hand: draft, mid, target at these seconds per new token."""
    for stage, rate in zip([0, 1, None], seconds_per_token):
        engine.router.record(stage, rate * 10, 10)
    return engine


PROMPTS, MAX_LENGTH = [torch.tensor([5, 9, 11, 3])], 20  # 16 new tokens: stops cost 1.6, 3.2 and 6.4 s


def test_the_predicted_acceptance_decides_between_the_stages():
    engine = _timed(_cascade(RouterConfig(lam=5.0)))
    p = engine.router._acceptance(PROMPTS[0], MAX_LENGTH)
    assert p.shape == (3,) and p[-1] == 1 and bool(((p > 0) & (p <= 1)).all())
    costs = engine.router.stop_costs(16)
    assert torch.allclose(costs.cumsum(0), torch.tensor([1.6, 3.2, 6.4], dtype=torch.float64))
    # stop at k: sum(C[:k+1]) + λ (1 - prod p[:k+1]); the target carries no loss
    totals = [float(costs[:k + 1].sum() + 5.0 * (1 - p[:k + 1].prod())) for k in range(2)] + [float(costs.sum())]
    best = min(range(3), key=lambda k: (totals[k], k))
    assert engine.router.route(PROMPTS, MAX_LENGTH) == (None if best == 2 else best)


@pytest.mark.parametrize("budget, stops", [(10.0, {None}), (3.5, {0, 1}), (2.0, {0}), (1.0, {0})])
def test_a_latency_budget_picks_a_stop_that_keeps_it(budget, stops):
    """Stops cost 1.6, 3.2 and 6.4 s: a budget of 3.5 s allows the draft or the mid, 2 s only the draft, and
    1 s none: the quickest stop answers."""
    engine = _timed(_cascade(RouterConfig(latency_budget=budget)))
    assert engine.router.route(PROMPTS, MAX_LENGTH) in stops


def test_a_stage_no_quicker_than_one_below_costs_it_nothing_more():
    engine = _timed(_cascade(RouterConfig(lam=1.0)), seconds_per_token=(0.3, 0.2, 0.4))
    assert torch.allclose(engine.router.stop_costs(10), torch.tensor([3.0, 0.0, 1.0], dtype=torch.float64))


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


def test_stages_without_the_lean_decoder_are_read_through_their_own_forward():
    """GPT-2 stages: the features come from the models' own forwards; λ = inf is still the target's output."""
    target = tiny_model("gpt2")
    engine = Engine(target, draft_model=[tiny_model("gpt2", seed=3), tiny_model("gpt2", seed=5)],
                    router=RouterConfig(lam=math.inf))
    assert all(runner.lean is None for runner in engine.router.runners)
    p = engine.router._acceptance(PROMPTS[0], MAX_LENGTH)
    assert p.shape == (3,) and p[-1] == 1 and bool(((p > 0) & (p <= 1)).all())
    inputs = _inputs(eos=EOS_ONE)
    assert torch.equal(engine.generate(**inputs), target.generate(**inputs))
