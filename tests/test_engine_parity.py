"""specbeam's generate equals transformers' token for token (float64 models on the CPU), for every
architecture and decoding mode, on batches of left-padded prompts of different lengths."""
import pytest
import torch

from specbeam import Engine
from parity import assert_same_beams, assert_same_tokens, run_both
from tiny_models import ARCHITECTURES, PAD, left_padded_batch, tiny_model

NEW_TOKENS = 12


def _inputs(seed=0):
    input_ids, attention_mask = left_padded_batch((7, 3, 5), seed=seed)
    return dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, pad_token_id=PAD)


def _frequent_tokens(model, inputs, count: int) -> list[int]:
    """Tokens greedy decoding emits early in some row, so that using them as eos stops rows mid-run."""
    greedy = model.generate(**inputs, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    return list(dict.fromkeys(greedy[:, 2].tolist()))[:count]


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"repetition_penalty": 1.3},
        {"no_repeat_ngram_size": 2},
        {"min_new_tokens": 6, "eos": 1},
        {"eos": 1},
        {"eos": 2},
    ],
    ids=["greedy", "repetition", "no-repeat-ngram", "min-new-tokens", "eos-one", "eos-list"],
)
def test_greedy_matches_transformers(arch, options):
    model, inputs, options = tiny_model(arch), _inputs(), dict(options)
    eos_count = options.pop("eos", None)
    eos = _frequent_tokens(model, inputs, eos_count) if eos_count else model.generation_config.eos_token_id
    if eos_count:
        options["eos_token_id"] = eos if eos_count > 1 else eos[0]
    reference, ours = run_both(model, do_sample=False, **inputs, **options)
    assert_same_tokens(reference, ours, inputs["input_ids"].shape[1], PAD, eos)


def test_eos_really_stops_rows_mid_run():
    """The eos cases above are meaningful: some row stops before the last step, another runs on."""
    model, inputs = tiny_model("llama"), _inputs()
    eos = _frequent_tokens(model, inputs, 1)[0]
    out = Engine(model).generate(**inputs, do_sample=False, eos_token_id=eos)
    generated = out[:, inputs["input_ids"].shape[1] :]
    assert out.shape[1] == inputs["input_ids"].shape[1] + NEW_TOKENS
    assert (generated == PAD).any() and not (generated[:, -1] == PAD).all()


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_beam_search_matches_transformers(arch, early_stopping, length_penalty):
    model, inputs = tiny_model(arch), _inputs()
    eos = _frequent_tokens(model, inputs, 1)
    reference, ours = run_both(
        model,
        num_beams=4,
        num_return_sequences=2,
        early_stopping=early_stopping,
        length_penalty=length_penalty,
        eos_token_id=eos[0],
        **inputs,
    )
    assert_same_beams(model, reference, ours)


@pytest.mark.parametrize(
    "options",
    [{"repetition_penalty": 1.5, "no_repeat_ngram_size": 3}, {"min_new_tokens": 5}, {"eos_list": True}],
    ids=["penalties", "min-new-tokens", "eos-list"],
)
def test_beam_search_with_processors_matches_transformers(options):
    model, inputs, options = tiny_model("llama"), _inputs(seed=1), dict(options)
    options["eos_token_id"] = _frequent_tokens(model, inputs, 2 if options.pop("eos_list", False) else 1)
    reference, ours = run_both(model, num_beams=3, **inputs, **options)
    assert_same_beams(model, reference, ours)


def test_max_length_and_single_prompt():
    model = tiny_model("qwen2")
    input_ids = torch.tensor([[5, 6, 7, 8]])
    reference = model.generate(input_ids, max_length=10, do_sample=False)
    assert torch.equal(Engine(model).generate(input_ids, max_length=10, do_sample=False), reference)


def test_outputs_are_transformers_classes():
    from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

    model, inputs = tiny_model("llama"), _inputs()
    engine = Engine(model)
    greedy = engine.generate(**inputs, return_dict_in_generate=True)
    beam = engine.generate(**inputs, num_beams=2, return_dict_in_generate=True)
    assert isinstance(greedy, GenerateDecoderOnlyOutput) and greedy.stats.steps == NEW_TOKENS
    assert isinstance(beam, GenerateBeamDecoderOnlyOutput) and len(beam.trace.steps) == beam.stats.steps


def test_garbage_in_unused_slots_does_not_reach_outputs():
    """Slots a sequence never wrote get attention weight exactly 0: a pool full of garbage changes nothing."""
    model, inputs = tiny_model("llama"), _inputs()
    engine = Engine(model)
    engine.generate(**inputs, num_beams=2)  # sizes the pool
    engine.cache.pool.normal_(0.0, 1e4)
    reference, ours = run_both(model, engine, num_beams=2, **inputs)
    assert_same_beams(model, reference, ours)
