"""Speculative greedy decoding and beam search under logits processors that read the prefix give exactly the
target's own output (transformers' generate, float64), with drafts good enough that nodes at depth 2 and
deeper are accepted: every tree node must be processed with its own prefix, drafted tokens included.
Each option is shown to change transformers' output, so that it matters here."""
import copy
import functools

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from specbeam import Engine
from specbeam.config import SpecConfig
from parity import assert_same_beams, assert_same_tokens
from test_speculative import drafts
from tiny_models import PAD, left_padded_batch, tiny_model

NEW_TOKENS = 12
SPEC = SpecConfig(depth=3, adaptive=False)
MODES = {"greedy": dict(do_sample=False), "beam4": dict(num_beams=4, num_return_sequences=2)}


@functools.cache
def _draft(name: str):
    """perfect: the target's copy; perturbed: noise 0.01 on every weight; nearly-perfect: noise 0.001 (beam search
    accepts a depth only when every beam the target keeps is a tree node: the 0.01 copy's ranking strays)."""
    if name in ("perfect", "perturbed"):
        return drafts()[name]
    draft = copy.deepcopy(tiny_model("llama"))
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.001)
    return draft


class DiscourageRecent(LogitsProcessor):
    """A user processor that reads the prefix: the last two tokens of each row lose 4 from their score."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        rows = torch.arange(scores.shape[0], device=scores.device)[:, None]
        scores[rows, input_ids[:, -2:]] -= 4.0
        return scores


def _inputs() -> dict:
    input_ids, attention_mask = left_padded_batch((7, 3, 5), seed=0)
    return dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, pad_token_id=PAD)


@functools.cache
def _plain(mode: str) -> torch.Tensor:
    """transformers' sequences without any option: [rows, prompt + new]."""
    return tiny_model("llama").generate(**_inputs(), **MODES[mode])


def _generated(mode: str) -> torch.Tensor:
    return _plain(mode)[:, _inputs()["input_ids"].shape[1]:]


def _options(name: str, mode: str) -> dict:
    """The generate arguments of each option, built from what plain decoding emits so that each one bites."""
    generated = _generated(mode)
    if name == "repetition-penalty":
        return dict(repetition_penalty=1.3)
    if name == "no-repeat-ngram":
        return dict(no_repeat_ngram_size=2)
    if name == "min-new-tokens":  # a token emitted early becomes eos, held back for 8 tokens
        return dict(min_new_tokens=8, eos_token_id=int(generated[0, 2]))
    if name == "bad-words":  # one token banned everywhere, one banned only after the token before it
        return dict(bad_words_ids=[[int(generated[0, 3])], generated[1, 4:6].tolist()])
    if name == "user-processor":
        return dict(logits_processor=LogitsProcessorList([DiscourageRecent()]))
    raise ValueError(name)


OPTIONS = ["repetition-penalty", "no-repeat-ngram", "min-new-tokens", "bad-words", "user-processor"]


def _call(option: str, mode: str) -> dict:
    return dict(**_inputs(), **_options(option, mode), **MODES[mode], return_dict_in_generate=True,
                output_scores=True, output_logits=True)


@functools.cache
def _reference(option: str, mode: str):
    """transformers' own output under the option (one for every draft), which the option does change."""
    reference = tiny_model("llama").generate(**_call(option, mode))
    assert not torch.equal(reference.sequences, _plain(mode))
    return reference


def _speculative(option: str, mode: str, draft: str):
    engine = Engine(tiny_model("llama"), draft_model=_draft(draft), spec=SPEC)
    out = engine.generate(**_call(option, mode))
    assert len(out.stats.accepted_by_depth) >= 2 and out.stats.accepted_by_depth[1] > 0, out.stats.accepted_by_depth
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks
    return out


@pytest.mark.parametrize("draft", ["perfect", "perturbed"])
@pytest.mark.parametrize("option", OPTIONS)
def test_speculative_greedy_with_a_prefix_processor_equals_transformers(option, draft):
    """Tokens, scores and logits equal transformers' own greedy output under the option; nodes at depth 2 were
    accepted."""
    model, options = tiny_model("llama"), _options(option, "greedy")
    eos = options.get("eos_token_id", model.generation_config.eos_token_id)
    assert_same_tokens(_reference(option, "greedy"), _speculative(option, "greedy", draft),
                       _inputs()["input_ids"].shape[1], PAD, eos)


@pytest.mark.parametrize("draft", ["perfect", "nearly-perfect"])
@pytest.mark.parametrize("option", OPTIONS)
def test_speculative_beam_search_with_a_prefix_processor_equals_transformers(option, draft):
    """Beams, beam indices and scores equal transformers' own beam search under the option; nodes at depth 2 were
    accepted."""
    assert_same_beams(tiny_model("llama"), _reference(option, "beam4"), _speculative(option, "beam4", draft))
