"""Bad input gets a ValueError / TypeError naming the argument before any work; afterwards the engine still
works and every KV block is free again."""
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from specbeam import Engine
from specbeam.validation import UnsupportedOptionError
from tiny_models import VOCAB, left_padded_batch, tiny_model

PROMPT = torch.tensor([[5, 6, 7]])

class _WantsCurLen(LogitsProcessor):
    """A processor that wants an argument beyond (input_ids, scores): transformers' list refuses it at its first
    call, specbeam before any work."""

    def __call__(self, input_ids, scores, cur_len):
        return scores


BAD_CALLS = [
    (dict(inputs=torch.tensor([[5, VOCAB]])), ValueError, "input_ids"),
    (dict(inputs=torch.tensor([[5, -1]])), ValueError, "input_ids"),
    (dict(inputs=torch.zeros((1, 0), dtype=torch.long)), ValueError, "input_ids"),
    (dict(inputs=torch.zeros((0, 3), dtype=torch.long)), ValueError, "input_ids"),
    (dict(inputs=torch.tensor([[5.0, 6.0]])), TypeError, "input_ids"),
    (dict(inputs=[[5, 6]]), TypeError, "input_ids"),
    (dict(inputs=torch.tensor([5, 6])), ValueError, "input_ids"),
    (dict(inputs=None), ValueError, "input_ids"),
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    (dict(num_beams=0), ValueError, "num_beams"),
    (dict(num_beams=2, num_return_sequences=3), ValueError, "num_return_sequences"),
    (dict(do_sample=True, top_p=0.0), ValueError, "top_p"),
    (dict(do_sample=True, top_p=1.5), ValueError, "top_p"),
    (dict(do_sample=True, temperature=0.0), ValueError, "temperature"),
    (dict(do_sample=True, temperature=-1.0), ValueError, "temperature"),
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
    (dict(attention_mask=torch.ones(1, 4, dtype=torch.long)), ValueError, "attention_mask"),
    (dict(attention_mask=torch.tensor([[1, 1, 0]])), ValueError, "attention_mask"),
    (dict(attention_mask=torch.tensor([[0, 0, 0]])), ValueError, "attention_mask"),
    (dict(eos_token_id=VOCAB + 5), ValueError, "eos_token_id"),
    (dict(early_stopping="sometimes", num_beams=2), ValueError, "early_stopping"),
    (dict(generator=3, do_sample=True), TypeError, "generator"),
    (dict(logits_processor=LogitsProcessorList([_WantsCurLen()])), ValueError, "logits_processor"),
]


def _call(engine, kwargs):
    return engine.generate(**{"inputs": PROMPT, "max_new_tokens": 4, **kwargs})


@pytest.mark.parametrize("kwargs, error, name", BAD_CALLS, ids=[f"{c[2]}-{i}" for i, c in enumerate(BAD_CALLS)])
def test_bad_input_is_refused_by_name_and_the_engine_recovers(kwargs, error, name):
    engine = Engine(tiny_model("llama"))
    with pytest.raises(error, match=name):
        _call(engine, kwargs)
    out = engine.generate(PROMPT, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(output_attentions=True, return_dict_in_generate=True), "output_attentions"),
        (dict(num_beams=2, do_sample=True), "beam sampling"),
        (dict(penalty_alpha=0.6, top_k=4), "penalty_alpha"),
        (dict(prefix_allowed_tokens_fn=lambda batch, ids: [1]), "prefix_allowed_tokens_fn"),
        (dict(past_key_values=object()), "past_key_values"),
    ],
)
def test_unsupported_options_are_refused_by_name(kwargs, option):
    with pytest.raises(UnsupportedOptionError, match=option):
        Engine(tiny_model("llama")).generate(PROMPT, max_new_tokens=3, **kwargs)


def test_non_finite_logits_raise_and_free_every_block():
    model = tiny_model("llama")
    engine = Engine(model)
    input_ids, attention_mask = left_padded_batch()
    final_norm = model.model.norm.weight  # read at every forward (the linear weights are packed once)
    saved = final_norm.data.clone()
    try:
        with torch.no_grad():
            final_norm[7] = float("nan")
        with pytest.raises(FloatingPointError, match="non-finite logits"):
            engine.generate(input_ids, attention_mask=attention_mask, num_beams=3, max_new_tokens=5)
    finally:
        final_norm.data.copy_(saved)
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks
    assert torch.isfinite(engine.cache.pool).all()  # no nan K/V left behind for later requests
    assert engine.generate(input_ids, attention_mask=attention_mask, max_new_tokens=5).shape[1] == 12


def test_a_failing_stopping_criterion_frees_every_block():
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Explode(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if input_ids.shape[1] > 5:
                raise RuntimeError("boom")
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    engine = Engine(tiny_model("llama"))
    with pytest.raises(RuntimeError, match="boom"):
        engine.generate(PROMPT, max_new_tokens=6, num_beams=2, stopping_criteria=StoppingCriteriaList([Explode()]))
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks


def test_a_request_larger_than_the_cache_limit_is_refused():
    engine = Engine(tiny_model("llama"), max_cache_bytes=4096)
    with pytest.raises(ValueError, match="max_cache_bytes"):
        engine.generate(PROMPT, max_new_tokens=50, num_beams=4)


def test_streamer_with_beam_search_is_refused():
    from transformers.generation.streamers import BaseStreamer

    with pytest.raises(ValueError, match="streamer"):
        Engine(tiny_model("llama")).generate(PROMPT, num_beams=2, max_new_tokens=3, streamer=BaseStreamer())


def test_non_finite_logits_fail_only_the_request_they_belong_to():
    """Two requests in the same forwards, one whose prompt holds a token embedded as nan: that one fails, the other
    gives its solo output, and every block is free again."""
    model = tiny_model("llama")
    engine, poisoned, clean = Engine(model), torch.tensor([[5, 6, 7]]), torch.tensor([[5, 6, 8]])
    solo = engine.generate(clean, max_new_tokens=5)
    embedding = model.get_input_embeddings().weight
    saved = embedding.data.clone()
    try:
        with torch.no_grad():
            embedding[7] = float("nan")
        ids = [engine.add_request(poisoned, max_new_tokens=5), engine.add_request(clean, max_new_tokens=5)]
        results = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    results[out.request_id] = out
    finally:
        embedding.data.copy_(saved)
    assert isinstance(results[ids[0]].error, FloatingPointError)
    assert results[ids[1]].error is None and torch.equal(results[ids[1]].result, solo)
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks
