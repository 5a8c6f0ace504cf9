"""A cascade of drafts is lossless: with stages that agree with the target, perturb it or are unrelated to it,
greedy and beam search give exactly the target's own output (scores, beam indices and all) and sampling draws
from exactly its law; every stage's blocks are free afterwards; bad cascades are refused before any work."""
import copy

import pytest
import torch

from parity import assert_same_beams, assert_same_tokens, run_both
from specbeam import Engine
from specbeam.cascade import CascadeDrafter
from specbeam.config import SpecConfig
from test_speculative import EOS_ONE, _inputs, drafts
from test_speculative_sampling_fit import (_assert_depth_two_was_verified, _assert_fits_the_exact_law, _sample,
                                           models, PROMPT)
from tiny_models import PAD, tiny_model

CASCADES = {  # smallest first
    "unrelated-perturbed": ["unrelated", "perturbed"],
    "perturbed-perfect": ["perturbed", "perfect"],
    "perfect-unrelated": ["perfect", "unrelated"],
    "unrelated-perturbed-perfect": ["unrelated", "perturbed", "perfect"],
}
MODES = {"greedy": dict(do_sample=False), "beam4": dict(num_beams=4, num_return_sequences=2),
         "beam3-length-penalty": dict(num_beams=3, length_penalty=0.0, repetition_penalty=1.3)}
SPECS = {"depth3-width2": SpecConfig(depth=3, width=2, adaptive=False), "adaptive": SpecConfig()}


def _assert_all_blocks_free(engine: Engine) -> None:
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks
    for stage in engine.drafter.stages:
        assert stage.cache.allocator.num_free == stage.cache.allocator.num_blocks


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("cascade", CASCADES.values(), ids=CASCADES.keys())
def test_a_cascade_gives_the_target_alone(cascade, mode, spec):
    model, inputs = tiny_model("llama"), _inputs(eos=EOS_ONE)
    engine = Engine(model, draft_model=[drafts()[name] for name in cascade], spec=spec)
    assert isinstance(engine.drafter, CascadeDrafter) and len(engine.drafter.stages) == len(cascade)
    reference, ours = run_both(model, engine, **inputs, **mode)
    if "num_beams" in mode:
        assert_same_beams(model, reference, ours)
    else:
        assert_same_tokens(reference, ours, inputs["input_ids"].shape[1], PAD, EOS_ONE)
    if not spec.adaptive:  # (an adaptive tree may well run plain steps only: these drafts cost what the target does)
        assert len(ours.stats.stage_passes) == len(cascade) and ours.stats.stage_passes[0] > 0
    _assert_all_blocks_free(engine)


def test_agreeing_stages_save_target_passes_and_each_stage_drafts():
    model, inputs = tiny_model("llama"), _inputs(eos=EOS_ONE)
    engine = Engine(model, draft_model=[drafts()["perturbed"], drafts()["perfect"]],
                    spec=SpecConfig(depth=4, width=1, adaptive=False))
    out = engine.generate(**inputs, return_dict_in_generate=True)
    assert out.stats.target_passes - 1 < out.stats.steps / 2  # the prefill, then rounds of 2+ tokens
    small, mid = out.stats.stage_passes
    assert small > 0 and mid > 0 and out.stats.draft_passes == small + mid


CASCADE_SAMPLING = {  # (stages, chains under the root)
    "unrelated-agreeing-chain": (["unrelated", "agreeing"], 1),
    "agreeing-unrelated-three-chains": (["agreeing", "unrelated"], 3),
}


@pytest.mark.parametrize("stages, width", CASCADE_SAMPLING.values(), ids=CASCADE_SAMPLING.keys())
@pytest.mark.parametrize("penalty", [1.0, 2.0], ids=["no-penalty", "repetition-penalty"])
def test_cascade_sampling_fits_the_exact_joint_law(stages, width, penalty, fit_pvalue):
    """Each stage verifies the one below it with tree speculative sampling and hands its sample on as a chain
    with its own distribution as q: the target's 3 sampled tokens follow its exact processed law."""
    out = _sample([models()[name] for name in stages], SpecConfig(depth=2, width=width, adaptive=False), PROMPT,
                  penalty)
    _assert_depth_two_was_verified(out)
    _assert_fits_the_exact_law(out, PROMPT, penalty, fit_pvalue)


def test_bad_cascades_are_refused_before_any_work():
    model, inputs = tiny_model("llama"), _inputs(eos=EOS_ONE)
    with pytest.raises(ValueError, match="non-empty list"):
        Engine(model, draft_model=[])
    with pytest.raises(ValueError, match="non-empty list"):
        Engine(model, draft_model=[drafts()["perturbed"], "ngram"])
    other_vocab = copy.deepcopy(drafts()["perturbed"])
    other_vocab.resize_token_embeddings(other_vocab.config.vocab_size + 8)
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(model, draft_model=[drafts()["perturbed"], other_vocab])
    engine = Engine(model)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate(**inputs, assistant_model=[other_vocab])
    assert torch.equal(engine.generate(**inputs), model.generate(**inputs))  # and it keeps working
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks


def test_a_one_stage_list_is_that_draft():
    model = tiny_model("llama")
    engine = Engine(model, draft_model=[drafts()["perturbed"]])
    assert not isinstance(engine.drafter, CascadeDrafter)


def _costs(engine: Engine, target: dict, stages: list[dict]) -> None:
    """Fixed pass-cost curves for the target and each stage (their scales no longer move)."""
    for cost, shape in [(engine.core.target_cost, target)] + list(zip([s.pass_cost for s in engine.drafter.stages],
                                                                       stages)):
        cost.shape, cost.memory = shape, 1.0


@pytest.mark.parametrize("mode", [dict(do_sample=False), dict(num_beams=2)], ids=["greedy", "beam2"])
def test_the_policy_leaves_out_a_stage_that_does_not_pay(mode):
    """The larger stage costs far more than the target: the rounds draft with the smaller one alone (its
    cache catching up when it does run is exercised too); the output is the target's all the same."""
    model, inputs = tiny_model("llama"), _inputs(eos=EOS_ONE)
    engine = Engine(model, draft_model=[drafts()["perturbed"], drafts()["perfect"]])
    _costs(engine, {1: 1.0, 64: 1.0}, [{1: 0.0}, {1: 100.0}])
    reference, ours = run_both(model, engine, **inputs, **mode)
    if "num_beams" in mode:
        assert_same_beams(model, reference, ours)
    else:
        assert_same_tokens(reference, ours, inputs["input_ids"].shape[1], PAD, EOS_ONE)
    small, mid = ours.stats.stage_passes
    assert small > 0 and mid == 0
    _assert_all_blocks_free(engine)


def test_stage_subsets_are_chosen_by_rate_and_learn_from_their_own_rounds():
    model, inputs = tiny_model("llama"), _inputs(eos=EOS_ONE)
    engine = Engine(model, draft_model=[drafts()["perturbed"], drafts()["perfect"]])
    _costs(engine, {1: 1.0, 64: 1.0}, [{1: 0.0}, {1: 0.0}])
    engine.generate(**inputs)
    policy = engine.tree_policies[(id(engine.drafter), "greedy", 1)]
    assert set(policy.policies) == {(0,), (1,), (0, 1)}
    ran = {stages for stages, p in policy.policies.items() if p.measured or any(map(any, p.acceptance.at_risk))}
    assert ran  # the rounds went to the subsets that ran them
    for p in policy.policies.values():
        p.explore = 0.0
    rates = {stages: p.rate(*p.choose(3, 0), 3, 0) for stages, p in policy.policies.items()}
    depth, width, stages = policy.choose(3, 0)
    assert rates[stages] == max(rates.values()) and (depth, width) == policy.policies[stages].choose(3, 0)
    _assert_all_blocks_free(engine)
