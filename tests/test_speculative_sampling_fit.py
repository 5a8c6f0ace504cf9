"""Speculative sampling draws exactly the target's law, checked at the engine over 3 new tokens drafted at a
fixed depth 2, so that drafted tokens are verified below an accepted drafted token and the last token is a
bonus or recovered one: the joint law of the 3 tokens, and that of the first 2, fit the exact law that
transformers' own processors give on every prefix (`exact_law`, float64 models). Drafts: one chain per tree
and three i.i.d. chains per tree, from a draft that agrees often, an unrelated draft and n-gram lookup, with
and without a repetition penalty (a processor that depends on each node's prefix); the model-draft cases hold
every pair of (draft, tree shape, penalty) once. Chi-square tests at p > 1e-3 on fixed seeds; a token where
the exact law is zero fails outright."""
import functools

import pytest
import torch

from specbeam import Engine
from specbeam.config import SpecConfig
from exact_law import VOCAB8, cells, exact_joint, lookup_prompt, marginal, pooled, sampling_processors, vocab8_model

SAMPLES = 2500  # independent samples, as num_return_sequences of one call
NEW_TOKENS = 3
WARPERS = dict(temperature=0.7, top_k=6)  # top-k leaves zeros in the exact law: samples there fail outright
PENALTY = 2.0
PENALTIES = {"no-penalty": 1.0, "repetition-penalty": PENALTY}
PROMPT = torch.tensor([[3, 1, 3, 1, 3]])  # few distinct tokens: the penalty's effect depends on the new ones


@functools.cache
def models() -> dict:
    """The target, a slightly perturbed copy of it (agrees often) and another random model (unrelated)."""
    return {"target": vocab8_model(), "agreeing": vocab8_model(noise=0.01), "unrelated": vocab8_model(seed=7)}


def _sample(draft, spec: SpecConfig, prompt: torch.Tensor, penalty: float):
    engine = Engine(models()["target"], draft_model=draft, spec=spec)
    return engine.generate(prompt, do_sample=True, max_new_tokens=NEW_TOKENS, num_return_sequences=SAMPLES,
                           repetition_penalty=penalty, generator=torch.Generator().manual_seed(0),
                           return_dict_in_generate=True, **WARPERS)


def _assert_fits_the_exact_law(out, prompt: torch.Tensor, penalty: float, fit_pvalue) -> None:
    processors = sampling_processors(repetition_penalty=penalty, **WARPERS)
    law = exact_joint(models()["target"], prompt, processors, NEW_TOKENS)
    counts = cells(out.sequences, prompt.shape[1], VOCAB8)
    for tokens in (NEW_TOKENS, 2):
        pvalue = fit_pvalue(*pooled(marginal(counts, VOCAB8, tokens), marginal(law, VOCAB8, tokens)))
        assert pvalue > 1e-3, f"the law of the first {tokens} tokens does not fit (p = {pvalue:.2e})"


def _assert_depth_two_was_verified(out) -> None:
    """Drafted tokens at depth 2 were accepted: the verifier did decide below an accepted drafted token."""
    accepted = out.stats.accepted_by_depth
    assert len(accepted) >= 2 and accepted[1] > 0, accepted


MODEL_DRAFT_CASES = {  # (draft, chains under the root, repetition penalty): each pair of the three once
    "agreeing-chain-no-penalty": ("agreeing", 1, 1.0),
    "agreeing-three-chains-repetition-penalty": ("agreeing", 3, PENALTY),
    "unrelated-chain-repetition-penalty": ("unrelated", 1, PENALTY),
    "unrelated-three-chains-no-penalty": ("unrelated", 3, 1.0),
}


@pytest.mark.parametrize("draft, width, penalty", MODEL_DRAFT_CASES.values(), ids=MODEL_DRAFT_CASES.keys())
def test_model_draft_sampling_fits_the_exact_joint_law(draft, width, penalty, fit_pvalue):
    """A draft model's trees of depth 2 (one chain, or three i.i.d. chains under the root): the 3 sampled
    tokens follow the target's exact processed law."""
    spec = SpecConfig(depth=2, width=width, adaptive=False)
    out = _sample(models()[draft], spec, PROMPT, penalty)
    _assert_depth_two_was_verified(out)
    _assert_fits_the_exact_law(out, PROMPT, penalty, fit_pvalue)


@pytest.mark.parametrize("penalty", PENALTIES.values(), ids=PENALTIES.keys())
def test_ngram_sampling_fits_the_exact_joint_law(penalty, fit_pvalue):
    """n-gram lookup drafts a chain of 2 found earlier in the prompt (each drafted token a point mass for the
    verifier): the 3 sampled tokens follow the target's exact processed law."""
    prompt = lookup_prompt(models()["target"], sampling_processors(repetition_penalty=penalty, **WARPERS))
    out = _sample("ngram", SpecConfig(depth=2, adaptive=False), prompt, penalty)
    _assert_depth_two_was_verified(out)
    _assert_fits_the_exact_law(out, prompt, penalty, fit_pvalue)
