"""Streamers, stop strings and user stopping criteria behave as in transformers."""
import string

import torch
from tokenizers import Tokenizer
from tokenizers.decoders import Fuse
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Split
from transformers import MaxTimeCriteria, PreTrainedTokenizerFast, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from specbeam import Engine
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


def test_stop_strings_match_transformers():
    model, tokenizer = tiny_model("gpt2"), _char_tokenizer()
    input_ids, attention_mask = left_padded_batch((5, 3), seed=6)
    greedy = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False)
    stop = tokenizer.decode(greedy[0, -4:-2])  # two characters row 0 emits mid-run
    reference, ours = run_both(model, input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=10,
                               do_sample=False, stop_strings=[stop], tokenizer=tokenizer)
    assert torch.equal(reference.sequences, ours.sequences)
    # the stop string did fire: row 0 emitted it, then only padding
    assert stop in tokenizer.decode(ours.sequences[0]) and ours.sequences[0, -1] == PAD


def test_user_stopping_criteria_are_applied():
    model, prompt = tiny_model("qwen2"), torch.tensor([[7, 8, 9]])
    criteria = StoppingCriteriaList([MaxTimeCriteria(max_time=0.0)])  # stops after the first token
    out = Engine(model).generate(prompt, max_new_tokens=10, stopping_criteria=criteria)
    assert out.shape == (1, 4)
