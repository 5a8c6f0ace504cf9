"""Streamers, stop strings and user stopping criteria behave as in transformers."""
import string

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.decoders import Fuse
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Split
from transformers import (EosTokenCriteria, MaxLengthCriteria, MaxTimeCriteria, PreTrainedTokenizerFast,
                          StoppingCriteria, StoppingCriteriaList)
from transformers.generation.streamers import BaseStreamer

from specbeam import Engine
from specbeam.stopping import StopCheck
from parity import run_both
from tiny_models import PAD, VOCAB, left_padded_batch, tiny_model


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


def _char_tokenizer() -> PreTrainedTokenizerFast:
    """One printable character per token id, so that stop strings can match token text."""
    characters = (string.ascii_letters + string.digits + string.punctuation)[:VOCAB]
    characters += "".join(chr(0x100 + i) for i in range(VOCAB - len(characters)))
    model = WordLevel({c: i for i, c in enumerate(characters)}, unk_token=characters[0])
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = Split("", behavior="isolated")
    tokenizer.decoder = Fuse()  # tokens join without spaces
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def test_streamer_sees_the_prompt_then_each_token():
    model, prompt = tiny_model("llama"), torch.tensor([[5, 9, 11, 3]])
    streams = [Collect(), Collect()]
    reference = model.generate(prompt, max_new_tokens=6, do_sample=False, streamer=streams[0])
    ours = Engine(model).generate(prompt, max_new_tokens=6, do_sample=False, streamer=streams[1])
    assert torch.equal(ours, reference) and streams[1].ended
    assert torch.equal(streams[1].chunks[0], prompt)
    assert torch.equal(torch.cat([c.flatten() for c in streams[1].chunks]), ours.flatten())


@pytest.mark.parametrize("num_beams", [1, 3])
def test_stop_strings_match_transformers(num_beams):
    model, tokenizer = tiny_model("gpt2"), _char_tokenizer()
    input_ids, attention_mask = left_padded_batch((5, 3), seed=6)
    greedy = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False)
    stop = tokenizer.decode(greedy[0, -4:-2])  # two characters row 0 emits mid-run
    reference, ours = run_both(model, input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=10,
                               do_sample=False, num_beams=num_beams, stop_strings=[stop], tokenizer=tokenizer)
    assert torch.equal(reference.sequences, ours.sequences)
    if num_beams == 1:  # the stop string did fire: row 0 emitted it, then only padding
        assert stop in tokenizer.decode(ours.sequences[0]) and ours.sequences[0, -1] == PAD


def test_beam_candidates_are_read_off_their_length_and_token_as_the_criteria_answer():
    criteria = StoppingCriteriaList([MaxLengthCriteria(7), EosTokenCriteria(torch.tensor([3, 9]))])
    stop = StopCheck(criteria)
    assert not stop.others
    tokens = torch.tensor([[3, 4, 9], [1, 2, 5]])  # [prompts, candidates]
    for lengths in ([6, 6], [7, 5], [8, 7]):
        called = [criteria(torch.cat([torch.full((1, n - 1), 11), tokens[g, k].view(1, 1)], 1), None)[0]
                  for g, n in enumerate(lengths) for k in range(3)]
        limits = torch.full((2,), stop.max_length)  # each prompt's limit: this check's own
        assert torch.equal(stop.hits(tokens, torch.tensor(lengths), limits), torch.stack(called).view(2, 3))


def test_user_stopping_criteria_are_applied():
    model, prompt = tiny_model("qwen2"), torch.tensor([[7, 8, 9]])
    criteria = StoppingCriteriaList([MaxTimeCriteria(max_time=0.0)])  # stops after the first token
    out = Engine(model).generate(prompt, max_new_tokens=10, stopping_criteria=criteria)
    assert out.shape == (1, 4)


class Record(StoppingCriteria):
    """Stops nothing; keeps the length of every sequence it is shown."""

    def __init__(self):
        self.lengths = []

    def __call__(self, input_ids, scores, **kwargs):
        self.lengths.append(input_ids.shape[1])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_user_criteria_see_every_step_beside_eos_ids():
    model, prompt = tiny_model("llama"), torch.tensor([[5, 9, 11, 3]])
    greedy = model.generate(prompt, max_new_tokens=8, do_sample=False)
    eos = [96, int(greedy[0, 7])]  # the second: a token the row emits mid-run
    records = [Record(), Record()]
    outs = [generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=eos,
                     stopping_criteria=StoppingCriteriaList([record]))
            for generate, record in zip((model.generate, Engine(model).generate), records)]
    assert torch.equal(outs[0], outs[1]) and outs[1].shape[1] < greedy.shape[1]
    assert records[0].lengths == records[1].lengths


def test_a_max_length_criterion_that_may_warn_is_called():
    """transformers' max-length criterion warns while a row is longer than the model's positions: that one is
    called; one that cannot warn is read off the row's length."""
    quiet, warns = (StopCheck(StoppingCriteriaList([MaxLengthCriteria(10, max_position_embeddings=p)])) for p in (9, 5))
    assert quiet.max_length == 10 and not quiet.others
    assert warns.max_length is None and len(warns.others) == 1
    assert warns(list(range(10)), lambda: None, "cpu") and not warns(list(range(9)), lambda: None, "cpu")
