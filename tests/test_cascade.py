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
