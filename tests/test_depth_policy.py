"""Adaptive draft depth: the policy tries every depth, then runs the fastest; whatever it picks, the output is
the target's own."""
import itertools

import pytest
import torch

from parity import assert_same_beams, assert_same_tokens, run_both
from specbeam import Engine
from specbeam.depth_policy import DepthPolicy
from test_speculative import EOS_ONE, _inputs, drafts
from tiny_models import PAD, tiny_model


class CyclingDepths:
    """A stand-in policy: depths in a fixed cycle, so that a run interleaves plain steps and drafting rounds
    the same way every time (after each plain stretch the draft catches up on the tokens it has not seen)."""

    def __init__(self, depths: list[int]):
        self.depths = itertools.cycle(depths)

    def choose(self) -> int:
        return next(self.depths)

    def record(self, depth: int, steps: int, seconds: float) -> None:
        pass


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


def test_policy_explores_the_neighbours_of_the_best_less_the_slower_they_are():
    rates = {0: 0.0, 1: 1.0, 2: 1.0, 3: 0.5, 4: 1.0}  # depth 1 is first among the fastest: the best
    policy = DepthPolicy(max_depth=4, explore=0.5, totals={d: (r, 1.0) for d, r in rates.items()})
    picks = [policy.choose() for _ in range(2000)]
    # a neighbour as fast as the best: chosen with probability 1/2 (which one) * explore; depth 0, never
    assert 0.2 < picks.count(2) / 2000 < 0.3 and set(picks) == {1, 2}
    policy.totals[2] = (0.0, 1.0)
    policy.totals[1] = (0.0, 1.0)  # now depth 4 is the best, and depth 3 (half as fast) its one neighbour
    picks = [policy.choose() for _ in range(2000)]
    assert 0.04 < picks.count(3) / 2000 < 0.09 and set(picks) == {3, 4}  # 1/2 * 0.5 * (1/2)^2 = 1/16


def test_a_policy_that_prefers_plain_steps_drafts_nothing_and_changes_nothing():
    """Every round at depth 0 is a plain step: transformers' greedy and beam outputs, and for sampling the very
    tokens of specbeam's plain sampling from the same seed (the same draws from the same distributions)."""
    model, inputs = tiny_model("llama"), _inputs(eos=EOS_ONE)
    engine = Engine(model, draft_model=drafts()["perturbed"])
    reference = model.generate(**inputs, do_sample=False)
    for mode in (dict(do_sample=False), dict(num_beams=4), dict(do_sample=True, top_k=0)):
        name = "beam" if "num_beams" in mode else "sample" if mode.get("do_sample") else "greedy"
        key = (id(engine.drafter), name, inputs["input_ids"].shape[0])
        rates = {0: 1.0, 1: 0.5, 2: 0.1, 3: 0.1, 4: 0.1}
        engine.depth_policies[key] = DepthPolicy(4, explore=0.0, totals={d: (r, 1.0) for d, r in rates.items()})
        torch.manual_seed(7)
        out = engine.generate(**inputs, **mode, return_dict_in_generate=True)
        assert out.stats.draft_passes == 0 and out.stats.rounds == 0
        torch.manual_seed(7)
        plain = Engine(model).generate(**inputs, **mode) if name == "sample" else model.generate(**inputs, **mode)
        assert torch.equal(out.sequences, plain)
        assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks
    assert torch.equal(engine.generate(**inputs, do_sample=False), reference)


@pytest.mark.parametrize("draft", ["perfect", "perturbed", "ngram"])
@pytest.mark.parametrize("mode", [dict(do_sample=False), dict(num_beams=4, num_return_sequences=2),
                                  dict(num_beams=8, length_penalty=0.0)], ids=["greedy", "beam4", "beam8"])
def test_plain_steps_and_drafting_rounds_interleaved_give_the_target_alone(draft, mode):
    model, inputs = tiny_model("llama"), _inputs(eos=EOS_ONE)
    engine = Engine(model, draft_model=drafts()[draft])
    name = "beam" if "num_beams" in mode else "greedy"
    engine.depth_policies[(id(engine.drafter), name, inputs["input_ids"].shape[0])] = CyclingDepths([2, 0, 0, 1, 0, 3])
    reference, ours = run_both(model, engine, **inputs, **mode)
    if name == "beam":
        assert_same_beams(model, reference, ours)
    else:
        assert_same_tokens(reference, ours, inputs["input_ids"].shape[1], PAD, EOS_ONE)
    assert ours.stats.drafted_tokens > 0
    if draft == "perfect":  # drafted tokens were accepted, after plain stretches too
        assert ours.stats.target_passes < ours.stats.steps
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks
