"""What the README promises and no other test checks: bad_words_ids and a user logits_processor in every mode,
a streamer under sampling, n-gram drafts under sampling, the refusals it lists, a non-default block_size, and
the engine on the torch reference when the C++ extension is absent. Greedy and beam search are compared with
transformers' own generate token for token (float64); sampling by what its law allows."""
import functools
import warnings

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

import specbeam
from specbeam import Engine, ops
from specbeam.config import SpecConfig
from specbeam.validation import UnsupportedOptionError
from parity import assert_same_beams, assert_same_tokens
from test_speculative import drafts
from test_speculative_processors import DiscourageRecent
from tiny_models import PAD, VOCAB, left_padded_batch, tiny_model

NEW_TOKENS = 10
SPEC = SpecConfig(depth=3, adaptive=False)


def _inputs() -> dict:
    input_ids, attention_mask = left_padded_batch((7, 3, 5), seed=0)
    return dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, pad_token_id=PAD)


def _engine(draft: str | None, **options) -> Engine:
    return Engine(tiny_model("llama"), draft_model=None if draft is None else drafts()[draft], spec=SPEC, **options)


MODES = {"greedy": dict(do_sample=False), "beam": dict(num_beams=3, num_return_sequences=2)}
CALLS = {  # generate's arguments beyond the inputs and the mode
    "plain": lambda: {},
    "bad-words": lambda: dict(bad_words_ids=_bad_words()),
    "user-processor": lambda: dict(logits_processor=LogitsProcessorList([DiscourageRecent()])),
    "repetition-penalty": lambda: dict(repetition_penalty=1.2),
}


def _call(mode: str, call: str) -> dict:
    return dict(**_inputs(), **MODES[mode], **CALLS[call](), return_dict_in_generate=True, output_scores=True,
                output_logits=True)


@functools.cache
def _reference(mode: str, call: str):
    """transformers' own output of the call (one for every engine)."""
    return tiny_model("llama").generate(**_call(mode, call))


def _assert_same_as_transformers(engine: Engine, mode: str, call: str) -> None:
    """engine's generate equals transformers' on the same call: greedy tokens and scores, or beams and their
    scores; every KV block is free afterwards."""
    model, reference, ours = tiny_model("llama"), _reference(mode, call), engine.generate(**_call(mode, call))
    if mode == "beam":
        assert_same_beams(model, reference, ours)
    else:
        assert_same_tokens(reference, ours, _inputs()["input_ids"].shape[1], PAD, model.generation_config.eos_token_id)
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks


# --- bad_words_ids ---------------------------------------------------------------------------------------------

@functools.cache
def _bad_words() -> list[list[int]]:
    """One token plain greedy emits, banned everywhere, and a pair it emits, the second banned after the first."""
    generated = tiny_model("llama").generate(**_inputs(), do_sample=False)[:, _inputs()["input_ids"].shape[1]:]
    return [[int(generated[0, 3])], generated[1, 4:6].tolist()]


@pytest.mark.parametrize("mode", MODES)
def test_bad_words_ids_match_transformers(mode):
    """bad_words_ids (a single token and a two-token sequence) give transformers' own output, which they change."""
    assert not torch.equal(_reference(mode, "bad-words").sequences, _reference(mode, "plain").sequences)
    _assert_same_as_transformers(_engine(None), mode, "bad-words")


@pytest.mark.parametrize("draft", [None, "perturbed", "ngram"])
def test_sampling_never_emits_bad_words(draft):
    """Under sampling, plain or speculative, a banned token never appears, nor the second token of a banned pair
    right after its first; both are taken from a run without the ban, so that the bans bite."""
    prompt_len = _inputs()["input_ids"].shape[1]
    kwargs = dict(**_inputs(), do_sample=True, num_return_sequences=16, eos_token_id=None,  # no row ends early
                  generator=torch.Generator().manual_seed(0))
    free = _engine(draft).generate(**kwargs)[:, prompt_len - 1:]  # the prompt's last token, then the new ones
    banned = int(free[:, 1:].flatten().mode().values)  # the most frequent new token
    first, second = next((a, b) for row in free.tolist() for a, b in zip(row, row[1:]) if banned not in (a, b))
    out = _engine(draft).generate(**kwargs, bad_words_ids=[[banned], [first, second]])[:, prompt_len - 1:]
    assert not (out[:, 1:] == banned).any()
    assert not ((out[:, :-1] == first) & (out[:, 1:] == second)).any()


# --- a user logits_processor -----------------------------------------------------------------------------------

class NextOfLast(LogitsProcessor):
    """Allows only (last token + 1) mod vocab: a processor that reads each row's prefix, and fixes the output."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = (input_ids[:, -1:] + 1) % scores.shape[1]
        return torch.full_like(scores, float("-inf")).scatter(1, allowed, scores.gather(1, allowed))


@pytest.mark.parametrize("mode", MODES)
def test_user_logits_processor_matches_transformers(mode):
    """A user processor that reads the prefix gives transformers' own output, which it changes."""
    assert not torch.equal(_reference(mode, "user-processor").sequences, _reference(mode, "plain").sequences)
    _assert_same_as_transformers(_engine(None), mode, "user-processor")


@pytest.mark.parametrize("draft", [None, "perfect", "perturbed", "ngram"])
def test_sampling_applies_a_user_processor_to_each_prefix(draft):
    """Under sampling, plain or speculative, the processor sees each new token's own prefix: with it allowing only
    the successor of the last token, every sample counts up from its prompt's last token."""
    inputs = _inputs()
    out = _engine(draft).generate(**inputs, do_sample=True, num_return_sequences=4, eos_token_id=None,
                                  logits_processor=LogitsProcessorList([NextOfLast()]),
                                  generator=torch.Generator().manual_seed(0))
    last = inputs["input_ids"][:, -1].repeat_interleave(4)
    expected = (last[:, None] + torch.arange(1, NEW_TOKENS + 1)) % VOCAB
    assert torch.equal(out[:, inputs["input_ids"].shape[1]:], expected)


# --- a streamer under sampling ---------------------------------------------------------------------------------

class Collect(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], 0

    def put(self, value):
        self.chunks.append(value.flatten())

    def end(self):
        self.ended += 1


@pytest.mark.parametrize("draft", [None, "perturbed", "ngram"])
def test_streamer_under_sampling_sees_the_returned_tokens(draft):
    """A streamer under sampling (speculative: one sequence) gets the prompt, then exactly the returned new
    tokens, in order, and one end()."""
    prompt, stream = torch.tensor([[5, 9, 11, 5, 9, 3]]), Collect()
    out = _engine(draft).generate(prompt, do_sample=True, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                                  streamer=stream, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, prompt.shape[1] + NEW_TOKENS)
    assert torch.equal(torch.cat(stream.chunks), out.flatten()) and stream.ended == 1


# --- n-gram drafts under sampling ------------------------------------------------------------------------------

def test_ngram_drafts_are_accepted_under_sampling():
    """n-gram lookup drafts under sampling, and the target accepts them where the prompt repeats what the
    target would say (its own greedy continuation, repeated), at depth 1 and 2."""
    model = tiny_model("llama")
    start = torch.tensor([[5, 9, 11]])
    said = model.generate(start, do_sample=False, max_new_tokens=8, eos_token_id=None)
    prompt = torch.cat([said, start], dim=1)  # the lookup finds `start` and drafts what followed it
    out = _engine("ngram").generate(prompt, do_sample=True, max_new_tokens=6, num_return_sequences=16,
                                    temperature=0.3, eos_token_id=None, generator=torch.Generator().manual_seed(0),
                                    return_dict_in_generate=True)
    assert out.stats.drafted_tokens > 0
    assert len(out.stats.accepted_by_depth) >= 2 and out.stats.accepted_by_depth[1] > 0


# --- refusals --------------------------------------------------------------------------------------------------

REFUSED = {
    "beam sampling": dict(num_beams=2, do_sample=True),
    "penalty_alpha": dict(penalty_alpha=0.6, top_k=4),  # contrastive search
    "dola_layers": dict(dola_layers="high"),
    "num_beam_groups": dict(num_beams=4, num_beam_groups=2, diversity_penalty=0.5),  # group beam search
    "force_words_ids": dict(num_beams=2, force_words_ids=[[5]]),  # constrained beam search
    "guidance_scale": dict(guidance_scale=1.5),
    "output_attentions": dict(output_attentions=True, return_dict_in_generate=True),
    "output_hidden_states": dict(output_hidden_states=True, return_dict_in_generate=True),
    "inputs_embeds": dict(inputs=None, inputs_embeds=torch.zeros(1, 3, 32, dtype=torch.float64)),
    "past_key_values": dict(past_key_values=object()),
}


@pytest.mark.parametrize("draft", [None, "perturbed"])
@pytest.mark.parametrize("option", REFUSED)
def test_each_refusal_in_the_readme_raises_by_name(option, draft):
    """Engine.generate refuses each option the README lists with UnsupportedOptionError naming it, before any
    work, with or without a draft; every KV block is free and the engine still decodes."""
    engine = _engine(draft)
    with pytest.raises(UnsupportedOptionError, match=option):
        engine.generate(**{"inputs": torch.tensor([[5, 6, 7]]), "max_new_tokens": 3, **REFUSED[option]})
    assert engine.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3).shape == (1, 6)
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks


def test_right_padding_is_refused_by_name():
    """Right padding is refused with a ValueError naming attention_mask."""
    with pytest.raises(ValueError, match="attention_mask.*right padding"):
        _engine(None).generate(torch.tensor([[5, 6, 7]]), attention_mask=torch.tensor([[1, 1, 0]]), max_new_tokens=3)


@pytest.mark.parametrize("option", ["beam sampling", "guidance_scale", "output_attentions", "inputs_embeds"])
def test_patched_generate_hands_refused_options_to_transformers(option):
    """Through `patch`, a refused option that transformers runs itself goes to transformers' generate, with a
    warning naming it (the first time)."""
    model = tiny_model("llama")
    kwargs = {"inputs": torch.tensor([[5, 6, 7]]), "max_new_tokens": 3, **REFUSED[option],
              "return_dict_in_generate": True}
    specbeam.patch(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' own warnings about these options
            with pytest.warns(UserWarning, match=f"specbeam: .*{option}"):
                out = model.generate(**kwargs)
    finally:
        specbeam.unpatch(model)
    assert not hasattr(out, "stats")  # transformers' output, not specbeam's
    assert out.sequences.shape[1] == 3 + (0 if option == "inputs_embeds" else 3)


# --- a non-default block_size ----------------------------------------------------------------------------------

@pytest.mark.parametrize("block_size", [1, 5])
@pytest.mark.parametrize("draft", [None, "perfect"])
@pytest.mark.parametrize("mode", MODES)
def test_a_non_default_block_size_matches_transformers(block_size, draft, mode):
    """KV blocks of 1 or 5 slots (prompts, forks and draft trees cross block boundaries) change nothing."""
    _assert_same_as_transformers(_engine(draft, block_size=block_size), mode, "repetition-penalty")


# --- the torch reference when the C++ extension is absent -------------------------------------------------------

@pytest.fixture
def without_cpp(monkeypatch):
    """The C++ extension as if it were not built: every op takes the torch reference."""
    monkeypatch.setattr(ops, "_load_cpp", lambda: (None, "specbeam._C not built (simulated)"))
    info = ops.backend_info()
    assert all(not choice.startswith("cpp") for choice in info.values()), info


@pytest.mark.parametrize("draft", [None, "perturbed", "ngram"])
@pytest.mark.parametrize("mode", MODES)
def test_engine_without_the_cpp_extension_matches_transformers(without_cpp, draft, mode):
    """Without specbeam._C the engine runs on the torch reference, plain and speculative, and still gives
    transformers' own output."""
    _assert_same_as_transformers(_engine(draft), mode, "plain")
