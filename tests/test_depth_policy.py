"""Adaptive draft depth: the policy tries every depth, then runs the fastest; whatever it picks, the output is
the target's own."""
import torch

from specbeam import Engine
from specbeam.depth_policy import DepthPolicy
from test_speculative import _inputs, drafts
from tiny_models import tiny_model


def test_policy_tries_each_depth_deepest_first_then_runs_the_fastest():
    policy = DepthPolicy(max_depth=3, explore=0.0)
    tried = []
    for depth_rate in (3, 1, 5, 2):  # steps per second that depth 3, 2, 1, 0 will measure
        depth = policy.choose()
        tried.append(depth)
        policy.record(depth, steps=depth_rate, seconds=1.0)
    assert tried == [3, 2, 1, 0]
    assert policy.choose() == 1
    policy.record(1, steps=1, seconds=1.0)  # depth 1 slows down: (0.95 * 5 + 1) / (0.95 + 1) = 2.95 < 3
    assert policy.choose() == 3


def test_policy_explores_the_neighbours_of_the_best_at_its_rate():
    policy = DepthPolicy(max_depth=4, explore=0.5, totals={d: (float(d == 2), 1.0) for d in range(5)})
    picks = [policy.choose() for _ in range(400)]
    assert 0.4 < picks.count(2) / 400 < 0.6 and set(picks) == {1, 2, 3}
    policy.totals[0] = (5.0, 1.0)  # at depth 0 the only neighbour is depth 1
    assert set(policy.choose() for _ in range(100)) == {0, 1}


def test_a_policy_that_prefers_plain_steps_drafts_nothing_and_changes_nothing():
    model, inputs = tiny_model("llama"), _inputs()
    engine = Engine(model, draft_model=drafts()["perturbed"])
    reference = model.generate(**inputs, do_sample=False)
    for mode in (dict(do_sample=False), dict(num_beams=4)):
        key = (id(engine.drafter), "beam" if "num_beams" in mode else "greedy", inputs["input_ids"].shape[0])
        rates = {0: 1.0, 1: 0.5, 2: 0.1, 3: 0.1, 4: 0.1}
        engine.depth_policies[key] = DepthPolicy(4, explore=0.0, totals={d: (r, 1.0) for d, r in rates.items()})
        out = engine.generate(**inputs, **mode, return_dict_in_generate=True)
        assert out.stats.draft_passes == 0 and out.stats.rounds == 0
        assert torch.equal(out.sequences, model.generate(**inputs, **mode))
    assert torch.equal(engine.generate(**inputs, do_sample=False), reference)
