"""Trees sized by cost: the pass-cost curve, the acceptance hazards from censored ranks, the policy's choice of
the shape with the most expected tokens per second; and whatever it picks, the output is the target's own."""
import itertools
import math
import random

import pytest
import torch

from parity import assert_same_beams, assert_same_tokens, run_both
from specbeam import Engine
from specbeam.config import BEAM, GREEDY, SAMPLE
from specbeam.tree import DraftTree
from specbeam.tree_policy import (BEAMS, SAMPLING, Acceptance, PassCost, RoundSums, SummedPassCost, TreePolicy,
                                  TreeShape, _lower_convex_hull)
from specbeam.tree_policy import GREEDY as GREEDY_TREES
from test_speculative import EOS_ONE, _inputs, drafts
from tiny_models import PAD, tiny_model


def test_pass_cost_is_linear_between_counts_and_follows_the_last_slope_past_them():
    cost = PassCost({1: 1.0, 4: 2.0, 8: 6.0})
    assert cost(0.5) == 1.0 and cost(1) == 1.0
    assert cost(2) == pytest.approx(1 + 1 / 3) and cost(6) == pytest.approx(4.0)
    assert cost(16) == pytest.approx(14.0)  # slope (6 - 2) / (8 - 4) past 8
    assert cost.share(2, 6) == pytest.approx(6.0 * 2 / 8)  # T(8), split by tokens
    cost.record(7, 10.0)  # twice the calibrated time at 7, nearest to 8: 8's scale moves a tenth of the way to 2
    assert cost(8) == pytest.approx(6.0 * 1.1) and cost(16) == pytest.approx(14.0 * 1.1)  # (flat past the end)
    assert cost(1) == 1.0 and cost(6) == pytest.approx(4.0 * 1.05)  # (linear between the counts' scales)
    # a count's passes move its scale alone: a tree's dearer passes leave a plain step's cost as plain steps measure
    for _ in range(50):
        cost.record(1, 0.5)
    assert cost(1) == pytest.approx(0.5, rel=0.01) and cost(8) == pytest.approx(6.0 * 1.1)


def test_calibration_times_every_size_and_keeps_the_fastest():
    calls, clock = [], [0.0]
    durations = iter([0.03, 0.05, 0.02, 0.01, 0.012, 0.04, 0.02, 0.03, 0.025])  # three sweeps over 1, 2, 4

    def run(n):
        calls.append(n)
        clock[0] += next(durations)

    import specbeam.tree_policy as module
    saved = module.time.perf_counter
    module.time.perf_counter = lambda: clock[0]
    try:
        cost = PassCost()
        assert not cost.known
        cost.calibrate(run, sizes=(1, 2, 4))
    finally:
        module.time.perf_counter = saved
    assert calls == [1, 2, 4] * 3 and cost.known
    assert cost.shape == pytest.approx({1: 0.01, 2: 0.012, 4: 0.02})


def test_calibration_keeps_the_lower_convex_hull_of_the_times():
    times = {1: 1.0, 2: 1.1, 4: 3.0, 8: 2.0, 16: 4.0, 32: 8.5}  # 4 met a busy machine
    hull = _lower_convex_hull(times)
    assert hull == {1: 1.0, 2: 1.1, 8: 2.0, 16: 4.0, 32: 8.5}
    assert _lower_convex_hull({1: 1.0, 2: 2.0, 3: 3.0}) == {1: 1.0, 3: 3.0}  # a point on a segment is implied
    assert PassCost(hull)(4) == pytest.approx(1.1 + 0.9 * 2 / 6)


def test_acceptance_hazards_count_the_rounds_that_could_see_each_rank():
    acceptance = Acceptance(max_depth=2, max_width=3)
    for rank, width in [(0, 2), (1, 2), (None, 2), (0, 1), (None, 1)]:
        acceptance.record(1, rank, width)
    # rank 0: seen by all 5, hit twice; rank 1: seen by the two width-2 rounds past rank 0, hit once; rank 2:
    # never. Each shrinks towards its rank's rate over all depths (with the Beta(1, 1) prior), weight 2.
    pooled = [3 / 7, 2 / 4, 1 / 2]
    assert acceptance.hazard(1, 0) == pytest.approx((2 + 2 * pooled[0]) / 7)
    assert acceptance.hazard(1, 1) == pytest.approx((1 + 2 * pooled[1]) / 4)
    assert acceptance.hazard(1, 2) == pytest.approx(1 / 2)
    assert acceptance.hazard(2, 0) == pytest.approx(pooled[0])  # depth 2 unseen: as the shallower ones
    first = 1 - (1 - acceptance.hazard(1, 0)) * (1 - acceptance.hazard(1, 1))
    assert acceptance.within(1, 2) == pytest.approx(first)
    assert acceptance.expected_accepted([2, 1]) == pytest.approx(first + first * pooled[0])
    acceptance.fade()
    assert acceptance.at_risk[0][0] == pytest.approx(5 * 0.98)


def _tree(parents: list[int]) -> DraftTree:
    return DraftTree(list(range(len(parents))), parents)


def test_observations_rank_a_greedy_depth_and_a_sampling_nodes_children():
    tree = _tree([-1, 0, 0, 1, 2, 3, 4])  # depth 1: 1, 2; depth 2: 3, 4; depth 3: 5, 6
    greedy = TreeShape(GREEDY_TREES)
    assert greedy.observations(tree, [0, 2, 4]) == [(1, 1, 2), (2, 1, 2), (3, None, 2)]
    assert greedy.observations(tree, [0, 1, 3, 5]) == [(1, 0, 2), (2, 0, 2), (3, 0, 2)]
    assert greedy.observations(tree, [0]) == [(1, None, 2)]
    chains = _tree([-1, 0, 0, 0, 1, 2, 3])  # three i.i.d. chains of depth 2 under the root
    sampling = TreeShape(SAMPLING)
    assert sampling.observations(chains, [0, 3, 6]) == [(1, 2, 3), (2, 0, 1)]
    assert sampling.observations(chains, [0, 2]) == [(1, 1, 3), (2, None, 1)]


def _policy(kind=GREEDY_TREES, widths=(1, 2, 3), depth=5, target=None, draft=None, hits=0.7) -> TreePolicy:
    acceptance = Acceptance(depth, widths[-1])
    for d in range(1, depth + 1):  # a draft whose k-th node is the target's token with probability hits (1 - hits)^k
        for k in range(widths[-1]):
            acceptance.at_risk[d - 1][k] = 1000.0
            acceptance.hits[d - 1][k] = 1000.0 * hits
    target = target or PassCost({1: 1.0, 4: 1.1, 8: 1.5, 16: 3.0})
    return TreePolicy(TreeShape(kind, branch=2), acceptance, target, draft or PassCost({1: 0.1}), widths, explore=0.0)


def _rate(policy: TreePolicy, depth: int, width: int, trees: int, load: float) -> float:
    """The rate written out: tokens over the target's share and the draft's passes."""
    shape, acc = policy.shape, policy.acceptance
    accepted = 0.0
    if depth:
        reached = 1.0
        for d, w in enumerate(shape.ranked(depth, width), start=1):
            reached *= 1 - math.prod(1 - acc.hazard(d, k) for k in range(w))
            accepted += reached
    own = trees * (shape.roots + shape.nodes(depth, width))
    seconds = policy.target(own + load) * own / (own + load)
    if depth:
        roots = trees * shape.roots
        seconds += policy.draft(roots + load) * roots / (roots + load)
        seconds += (depth - 1) * policy.draft(trees * width + load) * trees * width / (trees * width + load)
    return policy.ratio(depth, width) * trees * (1 + accepted) / seconds


@pytest.mark.parametrize("seed", range(20))
def test_the_policy_chooses_the_shape_with_the_most_tokens_per_second(seed):
    rng = random.Random(seed)
    kind = rng.choice([GREEDY_TREES, SAMPLING, BEAMS])
    widths = (4,) if kind == BEAMS else (1, 2, 3)
    counts = sorted(rng.sample(range(1, 40), 4))
    target = PassCost({n: 0.01 * n ** rng.uniform(0.0, 1.2) + 0.05 for n in counts})
    policy = _policy(kind, widths, target=target, draft=PassCost({1: rng.uniform(0.0, 0.03), 8: 0.05}),
                     hits=rng.uniform(0.05, 0.95))
    policy.shape = TreeShape(kind, branch=2, roots=4 if kind == BEAMS else 1)
    trees, load = rng.randint(1, 4), rng.choice([0, 0, 10, 50])
    policy.measured = {(0, widths[0]): RoundSums(10.0, 10.0, rng.uniform(1, 2), 1.0),
                       (2, widths[-1]): RoundSums(rng.uniform(2, 10), 10.0, 1.0, 1.0),
                       (3, widths[0]): RoundSums(rng.uniform(2, 10), 10.0, rng.uniform(1, 2), 1.0)}
    shapes = [(0, widths[0])] + [(d, w) for d in range(1, 6) for w in widths]
    best = max(shapes, key=lambda s: _rate(policy, *s, trees, load))
    assert policy.choose(trees, load) == best
    assert policy.rate(*best, trees, load) == pytest.approx(_rate(policy, *best, trees, load))


def test_steep_passes_make_chains_flat_ones_wide_trees_and_a_useless_draft_plain_steps():
    steep = PassCost({1: 1.0, 2: 1.5, 4: 2.5, 8: 4.5})
    flat = PassCost({1: 1.0, 16: 1.05, 32: 2.0})
    assert _policy(target=steep, hits=0.5).choose(1, 0)[1] == 1
    depth, width = _policy(target=flat, hits=0.5).choose(1, 0)
    assert width == 3 and depth == 5
    assert _policy(target=flat, hits=0.0).choose(1, 0)[0] == 0
    # beside a heavy load the share of extra tokens is what counts: past the knee, speculation does not pay
    assert _policy(target=PassCost({1: 1.0, 64: 1.1, 128: 4.0}), hits=0.5).choose(1, 200)[0] == 0


def test_measured_rounds_correct_the_model_per_shape():
    """A shape's rate is the model's times two measured factors, tokens advanced over expected (prior: 8 one-tree
    rounds) and seconds predicted over taken (prior: 2 rounds), each at the pooled drafting factor's word."""
    policy = _policy(target=PassCost({1: 1.0, 8: 1.1, 16: 2.0}), draft=PassCost({1: 0.1, 8: 0.5}), hits=0.7)
    best = policy.choose(1, 0)
    assert best[0] > 0 and policy.ratio(*best) == 1.0  # not run yet: the model's word
    tokens, seconds = policy.expected(*best, 1, 0)
    policy.observe(*best, 1, 0, tokens=tokens, seconds=2 * seconds, seen=[])  # as many tokens, in twice the time
    pooled_cost = 0.5  # the pool has seen that round alone
    assert policy.ratio(*best) == pytest.approx((seconds + 2 * seconds * pooled_cost) / (2 * seconds + 2 * seconds))
    other = next(shape for shape in ((1, 1), (2, 1), (1, 2)) if shape != best)
    assert policy.ratio(*other) == pytest.approx(pooled_cost)  # a drafting shape not run: the pool's word
    assert policy.ratio(0, 1) == 1.0  # plain steps: the model's
    lucky = policy.sums(best)
    policy.measured[best] = RoundSums(lucky.tokens + 3 * tokens, lucky.expected + tokens, lucky.seconds,
                                      lucky.predicted)  # a round of luck: 4 times the tokens expected
    assert policy.ratio(*best) < 1.5 * policy.ratio(*other)  # moves the token factor by less than 40%
    policy.measured[best] = RoundSums(1.0, 1.0, 30.0, 1.0)  # far slower than modelled: another shape runs
    assert policy.choose(1, 0) != best
    # a round whose draft first caught up on 5 tokens: the draft's time for them, D(6) - D(1), is not the shape's
    shape, (tokens, seconds) = (1, 1), policy.expected(1, 1, 1, 0)
    catch_up = policy.draft(6) - policy.draft(1)
    policy.observe(*shape, 1, 0, tokens=2, seconds=seconds + catch_up, seen=[], caught_up=5)
    assert policy.measured[shape] == RoundSums(2.0, pytest.approx(tokens), pytest.approx(seconds),
                                               pytest.approx(seconds))
    # the shape not run that round faded towards its prior: it will be tried again where the model ranks it
    assert policy.sums(best) == RoundSums(0.97, 0.97, pytest.approx(29.1), 0.97)
    before = policy.ratio(*best)
    for _ in range(200):
        policy.observe(*shape, 1, 0, tokens=tokens, seconds=seconds, seen=[])
    assert before < 0.2 and policy.ratio(*best) == pytest.approx(policy.ratio(*other), rel=0.05)
    # plain steps not run lately are judged as plain steps have measured here (they too leave work out of the
    # model), not by the model alone: else a while of drafting would leave them at the model's word
    tokens, seconds = policy.expected(0, 1, 1, 0)
    for _ in range(50):
        policy.observe(0, 1, 1, 0, tokens=tokens, seconds=3 * seconds, seen=[])
    for _ in range(400):
        policy.observe(*shape, 1, 0, tokens=tokens, seconds=seconds, seen=[])
    assert policy.sums((0, 1)).seconds < 1e-3 * seconds and policy.ratio(0, 1) == pytest.approx(1 / 3, rel=0.01)


def test_a_request_stepping_plainly_keeps_doing_so_while_that_is_nearly_the_best():
    """Going from plain steps to drafting costs the draft a catch-up, so a plain request stays plain while plain
    steps are within `stay` of the best; a drafting request takes the best shape at once."""
    policy = _policy(target=PassCost({1: 1.0, 4: 1.5, 8: 2.5}), hits=0.5)
    best = policy.choose(1, 0)
    plain = policy.rate(0, 1, 1, 0) / policy.rate(*best, 1, 0)
    assert best[0] > 0 and 0.5 < plain < 1
    policy.stay = plain - 0.01
    assert policy.choose(1, 0, current=(0, 1)) == (0, 1)  # nearly as good: kept
    policy.stay = plain + 0.01
    assert policy.choose(1, 0, current=(0, 1)) == best  # not good enough: gives way
    policy.stay = 0.0
    drafting = next(shape for shape in ((1, 1), (2, 1), (1, 2), (2, 2)) if shape != best)
    assert policy.choose(1, 0, current=drafting) == best  # from one drafting shape to another: no hysteresis


def test_a_plain_step_neighbours_the_depth_one_trees_of_every_width():
    policy = _policy()
    assert policy._neighbour((1, 3)) in {(0, 1), (2, 3), (1, 2)}
    assert {policy._neighbour((1, 3)) for _ in range(100)} == {(0, 1), (2, 3), (1, 2)}
    assert {policy._neighbour((0, 1)) for _ in range(20)} == {(1, 1)}


def test_exploration_tries_neighbours_of_the_best_shape_less_the_slower_they_are():
    policy = _policy(target=PassCost({1: 1.0, 2: 1.5, 4: 2.5, 8: 4.5}), hits=0.5)
    best = policy.choose(1, 0)
    policy.explore = 0.5
    picks = [policy.choose(1, 0) for _ in range(4000)]
    assert best in picks and len(set(picks)) > 1
    assert all(abs(d - best[0]) + abs(w - best[1]) == 1 or d == 0 and w == 1 for d, w in set(picks) - {best})
    for shape in set(picks) - {best}:  # chosen as a neighbour (1 of the k around best) with 0.5 (rate ratio)^2
        around = [n for n in [(best[0] + 1, best[1]), (best[0] - 1, best[1]), (best[0], best[1] + 1),
                              (best[0], best[1] - 1)] if 0 <= n[0] <= 5 and 1 <= n[1] <= 3 and (n[0] or n[1] == 1)]
        expected = 0.5 * (policy.rate(*shape, 1, 0) / policy.rate(*best, 1, 0)) ** 2 / len(around)
        assert abs(picks.count(shape) / 4000 - expected) < 0.03


def test_a_drafting_neighbour_is_tried_less_the_more_the_draft_would_catch_up_on():
    policy = _policy(target=PassCost({1: 1.0, 8: 1.1}), draft=PassCost({1: 0.1, 64: 2.0}), hits=0.3)
    policy.explore = 0.02
    # a plain step catches up on nothing
    assert policy._exploring((0, 1), 1.0, policy.expected(0, 1, 1, 0)[1], behind=lambda: 50) == policy.explore
    seconds = policy.expected(1, 1, 1, 0)[1]
    assert policy._exploring((1, 1), 1.0, policy.expected(1, 1, 1, 0)[1], behind=lambda: 0) == policy.explore
    assert policy._exploring((1, 1), 1.0, policy.expected(1, 1, 1, 0)[1], behind=lambda: 50) == pytest.approx(
        policy.explore * seconds / (seconds + policy.draft(50)))


def test_a_plain_request_starts_drafting_only_if_its_first_round_pays_for_the_catch_up():
    """Requests sharing a policy see the same best shape: if a small edge made each of them switch, every draft
    would catch up in one round. A plain request switches when the best shape's rate, its first round slowed by
    the catch-up, beats plain's by more than `stay`."""
    policy = _policy(target=PassCost({1: 1.0, 8: 1.1}), draft=PassCost({1: 0.1, 64: 2.0}), hits=0.3)
    best = policy.choose(1, 0)
    assert best[0] > 0
    plain = (0, policy.widths[0])
    edge = policy.rate(*best, 1, 0) / policy.rate(*plain, 1, 0)
    seconds = policy.expected(*best, 1, 0)[1]
    assert policy.choose(1, 0, current=plain, behind=lambda: 0) == best
    # a catch-up that takes the edge away, and one that leaves it
    for unfed, stays in ((64, True), (1, False)):
        first_round = edge * seconds / (seconds + policy.draft(unfed))
        assert (policy.stay * first_round <= 1.0) is stays
        assert policy.choose(1, 0, current=plain, behind=lambda: unfed) == (plain if stays else best)


def test_probes_from_plain_steps_back_off_while_drafting_does_not_pay():
    """Where the draft does not pay, each probe from plain steps costs its catch-up and teaches nothing new: the
    next one is half as likely, down to 2^-max_backoff; a probe after which drafting pays resets that."""
    policy = _policy(target=PassCost({1: 1.0, 8: 1.1}), draft=PassCost({1: 0.1, 64: 2.0}), hits=0.05)
    policy.explore = 0.02
    assert policy.choose(1, 0)[0] == 0
    round_seconds = policy.expected(1, 1, 1, 0)[1]
    base = policy._exploring((1, 1), 1.0, round_seconds, behind=lambda: 50)
    seconds = round_seconds + policy.draft(51) - policy.draft(1)  # the catch-up included
    for probes in range(1, 7):
        policy.observe(1, 1, 1, 0, tokens=1, seconds=seconds, seen=[(1, None, 1)], caught_up=50)
        backoff = min(probes, policy.max_backoff)
        assert policy.probe_backoff == backoff
        assert policy._exploring((1, 1), 1.0, round_seconds, behind=lambda: 50) == pytest.approx(base * 0.5 ** backoff)
    # a drafting best's neighbour
    assert policy._exploring((1, 1), 1.0, round_seconds, behind=lambda: 0) == policy.explore
    policy.observe(1, 1, 1, 0, tokens=200, seconds=seconds, seen=[(1, 0, 1)], caught_up=50)  # drafting paid
    assert policy.choose(1, 0)[0] > 0 and policy.probe_backoff == 0


def test_a_probe_pays_only_by_the_margin_a_switch_needs():
    """After a probe from plain steps, drafting that is best by less than `stay` asks of a plain request's switch
    did not pay (the probe backs off); by more, it did (the backoff resets)."""
    policy = _policy(widths=(1,))
    policy.probe_backoff = 2
    rates = {(0, 1): 1.0, (1, 1): 1.0 / policy.stay - 0.01}  # drafting best, within the margin
    policy._rated = lambda trees, load: (dict(rates), max(rates, key=rates.get), None)
    policy.observe(1, 1, 1, 0, tokens=1, seconds=1.0, seen=[(1, None, 1)], caught_up=5)
    assert policy.probe_backoff == 3
    rates[1, 1] = 1.0 / policy.stay + 0.01
    policy.observe(1, 1, 1, 0, tokens=1, seconds=1.0, seen=[(1, None, 1)], caught_up=5)
    assert policy.probe_backoff == 0


def test_a_cascades_draft_cost_prices_a_catch_up_as_its_stages_summed():
    """A cascade's policy holds a SummedPassCost for its draft: the catch-up a probe would pay is every stage's."""
    small, mid = PassCost({1: 0.1, 64: 2.0}), PassCost({1: 0.3, 64: 5.0})
    policy = _policy(target=PassCost({1: 1.0, 8: 1.1}), draft=SummedPassCost([small, mid]), hits=0.3)
    policy.explore = 0.02
    assert policy.draft(50) == pytest.approx(small(50) + mid(50))
    seconds = policy.expected(1, 1, 1, 0)[1]
    assert policy._exploring((1, 1), 1.0, policy.expected(1, 1, 1, 0)[1], behind=lambda: 50) == pytest.approx(
        policy.explore * seconds / (seconds + small(50) + mid(50)))

class CyclingShapes:
    """A stand-in policy: shapes in a fixed cycle, so that a run interleaves plain steps and drafting rounds
    the same way every time (after each plain stretch the draft catches up on the tokens it has not seen)."""

    shape = TreeShape(GREEDY_TREES)
    hold, holds = 1, True  # every round chooses

    def __init__(self, shapes: list[tuple[int, int]]):
        self.shapes = itertools.cycle(shapes)

    def choose(self, trees: int, load: float, current=None, behind=None) -> tuple[int, int]:
        return next(self.shapes)

    def observe(self, *round, rounds: int = 1) -> None:
        pass


def _key(engine: Engine, mode: str, beams: int = 1) -> tuple:
    return (id(engine.drafter), mode, beams)


def test_a_policy_that_prefers_plain_steps_drafts_nothing_and_changes_nothing():
    """Every round at depth 0 is a plain step: transformers' greedy and beam outputs, and for sampling the very
    tokens of specbeam's plain sampling from the same seed (the same draws from the same distributions)."""
    model, inputs = tiny_model("llama"), _inputs(eos=EOS_ONE)
    engine = Engine(model, draft_model=drafts()["perturbed"])
    reference = model.generate(**inputs, do_sample=False)
    for mode in (dict(do_sample=False), dict(num_beams=4), dict(do_sample=True, top_k=0)):
        name = BEAM if "num_beams" in mode else SAMPLE if mode.get("do_sample") else GREEDY
        engine.tree_policies[_key(engine, name, mode.get("num_beams", 1))] = _policy(
            BEAMS if name == BEAM else GREEDY_TREES, (8,) if name == BEAM else (1, 2), depth=4, hits=0.0)
        torch.manual_seed(7)
        out = engine.generate(**inputs, **mode, return_dict_in_generate=True)
        assert out.stats.draft_passes == 0 and out.stats.rounds == 0
        torch.manual_seed(7)
        plain = Engine(model).generate(**inputs, **mode) if name == SAMPLE else model.generate(**inputs, **mode)
        assert torch.equal(out.sequences, plain)
        assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks
    assert torch.equal(engine.generate(**inputs, do_sample=False), reference)


@pytest.mark.parametrize("draft", ["perfect", "perturbed", "ngram"])
@pytest.mark.parametrize("mode", [dict(do_sample=False), dict(num_beams=4, num_return_sequences=2),
                                  dict(num_beams=8, length_penalty=0.0)], ids=["greedy", "beam4", "beam8"])
def test_plain_steps_and_drafting_rounds_interleaved_give_the_target_alone(draft, mode):
    model, inputs = tiny_model("llama"), _inputs(eos=EOS_ONE)
    engine = Engine(model, draft_model=drafts()[draft])
    beams = mode.get("num_beams", 1)
    width = max(2, 2 * beams) if beams > 1 else 2
    engine.tree_policies[_key(engine, BEAM if beams > 1 else GREEDY, beams)] = CyclingShapes(
        [(2, width), (0, 1), (0, 1), (1, 1), (0, 1), (3, 1 if beams == 1 else width)])
    reference, ours = run_both(model, engine, **inputs, **mode)
    if beams > 1:
        assert_same_beams(model, reference, ours)
    else:
        assert_same_tokens(reference, ours, inputs["input_ids"].shape[1], PAD, EOS_ONE)
    assert ours.stats.drafted_tokens > 0
    if draft == "perfect":  # drafted tokens were accepted, after plain stretches too
        assert ours.stats.target_passes < ours.stats.steps
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks


@pytest.mark.parametrize("hold", [1, 4])
def test_a_choice_of_plain_steps_holds_for_the_policys_hold_rounds(hold):
    """A request whose policy chose plain steps asks it again only every `hold` rounds (a drafting choice is
    asked again the next round); the output is the target's either way."""
    model, inputs = tiny_model("llama"), _inputs(eos=EOS_ONE)
    engine = Engine(model, draft_model=drafts()["perturbed"])
    policy = CyclingShapes([(0, 1)])
    policy.hold = hold
    calls = []
    choose = policy.choose
    policy.choose = lambda *args, **kwargs: calls.append(args) or choose(*args, **kwargs)
    engine.tree_policies[_key(engine, GREEDY)] = policy
    reference, ours = run_both(model, engine, **inputs, do_sample=False)
    assert_same_tokens(reference, ours, inputs["input_ids"].shape[1], PAD, EOS_ONE)
    rounds = ours.stats.target_passes - 1  # after the prefill
    assert len(calls) == math.ceil(rounds / hold)


def test_a_probe_of_plain_steps_does_not_hold_but_a_considered_choice_does():
    """`holds` after `choose`: a plain step picked as the best (or kept by `stay`) holds for `hold` rounds; one
    picked as a probe of the best's neighbour lasts one round."""
    policy = _policy(target=PassCost({1: 1.0, 8: 1.1}), draft=PassCost({1: 0.1, 64: 2.0}), hits=0.3)
    best = policy.choose(1, 0)
    assert best[0] > 0 and policy.holds
    policy.explore = 1.0
    policy._neighbour = lambda shape: (0, policy.widths[0])
    policy._exploring = lambda *args: 1.0  # every draw probes
    assert policy.choose(1, 0) == (0, policy.widths[0]) and not policy.holds
    policy.explore = 0.0
    plain = (0, policy.widths[0])
    assert policy.choose(1, 0, current=plain, behind=lambda: 10**6) == plain and policy.holds  # kept by `stay`


def test_requests_beside_nearly_the_same_load_share_one_rating():
    """Each request's load is the other requests' tokens, a little different for each: loads within 6% of each
    other share one rating of the shapes, which is the rating at the coarse load."""
    policy = _policy(target=PassCost({1: 1.0, 8: 1.1}), draft=PassCost({1: 0.1, 64: 2.0}), hits=0.3)
    for load in (101, 103, 105, 107):
        policy.choose(1, load)
    assert list(policy._rates) == [(1, 104.0)]
    assert policy._rates[1, 104.0][0] == {shape: policy.rate(*shape, 1, 104.0) for shape in policy._ratios}
    policy.choose(1, 120)
    assert len(policy._rates) == 2


def test_the_engine_measures_pass_costs_at_first_use():
    model, inputs = tiny_model("llama"), _inputs(eos=EOS_ONE)
    engine = Engine(model, draft_model=drafts()["perfect"])
    engine.generate(**inputs, do_sample=False)
    for cost in (engine.core.target_cost, engine.drafter.pass_cost):  # timed at 1 .. 32 tokens, the hull kept
        assert {1, 32} <= set(cost.shape) <= {1, 2, 4, 8, 16, 32}
    policy = engine.tree_policies[_key(engine, GREEDY)]
    assert policy.measured and policy.target.scales  # rounds were timed too
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks


@pytest.mark.parametrize("mode", [dict(do_sample=False), dict(do_sample=True), dict(num_beams=2)])
def test_rounds_teach_the_policy_a_perfect_drafts_acceptance(mode):
    model, inputs = tiny_model("llama"), _inputs(eos=EOS_ONE)
    engine = Engine(model, draft_model=drafts()["perfect"])
    # target passes that cost the same whatever they feed, a free draft: the deepest trees pay
    engine.core.target_cost.shape, engine.drafter.pass_cost.shape = {1: 1.0, 64: 1.0}, {1: 0.0}
    engine.core.target_cost.memory = engine.drafter.pass_cost.memory = 1.0  # and they stay so
    out = engine.generate(**dict(inputs, max_new_tokens=12), **mode, min_new_tokens=12, return_dict_in_generate=True)
    name = BEAM if "num_beams" in mode else SAMPLE if mode.get("do_sample") else GREEDY
    acceptance = engine.tree_policies[_key(engine, name, mode.get("num_beams", 1))].acceptance
    assert out.stats.rounds > 0 and out.stats.target_passes < out.stats.steps
    assert acceptance.at_risk[0][0] > 0 and acceptance.at_risk[3][0] > 0  # it drafted 4 deep and saw it
    # the perfect draft's tree holds the target's token (greedy, beams), or it is accepted with probability 1
    assert all(acceptance.within(d, acceptance.max_width) > 0.6 for d in range(1, 5))
