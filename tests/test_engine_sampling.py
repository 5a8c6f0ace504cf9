"""Sampling draws from exactly the target's processed distribution: seeded runs equal transformers',
samples stay inside the allowed support, and frequencies fit the exact probabilities."""
import pytest
import torch
from scipy.stats import chisquare
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from specbeam import Engine
from tiny_models import PAD, left_padded_batch, tiny_model

WARPERS = dict(temperature=0.7, top_k=5, top_p=0.9)


def _run_together(engine: Engine, calls: list[dict]) -> list:
    """Every call added at once to the step API, stepped to the end; each call's result."""
    ids = [engine.add_request(**call) for call in calls]
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.result
    return [results[i] for i in ids]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_seeded_request_draws_the_same_tokens_whatever_runs_beside_it(arch):
    """A sampling request draws from its own generator (`generator=`, or one seeded from torch's global seed
    when it is added): its tokens are the same alone and in the same forwards as other requests. Transformers'
    own seeded draws are not reproduced, only its distribution (the goodness-of-fit tests below)."""
    model = tiny_model(arch)
    input_ids, attention_mask = left_padded_batch((6, 2, 4), seed=3)
    kwargs = dict(attention_mask=attention_mask, do_sample=True, max_new_tokens=10, pad_token_id=PAD, **WARPERS)
    engine = Engine(model)
    alone = engine.generate(input_ids, generator=torch.Generator().manual_seed(5), **kwargs)
    torch.manual_seed(11)
    global_seed = engine.generate(input_ids, **kwargs)
    others = [dict(input_ids=input_ids[:1], max_new_tokens=7, pad_token_id=PAD),
              dict(input_ids=input_ids[1:], attention_mask=attention_mask[1:], num_beams=3, max_new_tokens=5,
                   pad_token_id=PAD),
              dict(input_ids=input_ids, generator=torch.Generator().manual_seed(6), **kwargs)]
    torch.manual_seed(11)
    together = _run_together(engine, [others[0], dict(input_ids=input_ids, **kwargs), others[1],
                                      dict(input_ids=input_ids, generator=torch.Generator().manual_seed(5), **kwargs),
                                      others[2]])
    assert torch.equal(together[1], global_seed) and torch.equal(together[3], alone)
    assert not torch.equal(together[4], alone)  # another seed, other draws
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks


def test_generator_makes_runs_reproducible():
    model, engine = tiny_model("llama"), Engine(tiny_model("llama"))
    input_ids, attention_mask = left_padded_batch(seed=4)
    kwargs = dict(attention_mask=attention_mask, do_sample=True, max_new_tokens=8, top_k=0)
    runs = [engine.generate(input_ids, generator=torch.Generator().manual_seed(s), **kwargs) for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    del model


SUPPORT_CASES = {  # generate's arguments, and the processor transformers builds from them
    "top-k": ({"top_k": 3}, TopKLogitsWarper(3)),
    "top-p": ({"top_p": 0.5, "top_k": 0}, TopPLogitsWarper(0.5)),
    "min-p": ({"min_p": 0.2, "top_k": 0}, MinPLogitsWarper(0.2)),
    "typical-p": ({"typical_p": 0.5, "top_k": 0}, TypicalLogitsWarper(0.5)),
}


@pytest.mark.parametrize("warpers, processor", SUPPORT_CASES.values(), ids=SUPPORT_CASES.keys())
def test_samples_stay_inside_the_support(warpers, processor):
    """Every sampled token is one that transformers' own warper keeps after that token's prefix, on the model's
    own forward of the prefix (not on the engine's reported scores), and the warper does remove tokens there."""
    model = tiny_model("qwen2")
    input_ids, attention_mask = left_padded_batch((5, 8), seed=5)
    out = Engine(model).generate(input_ids, attention_mask=attention_mask, do_sample=True, max_new_tokens=15,
                                 num_return_sequences=3, eos_token_id=None, **warpers)
    prompts = attention_mask.sum(dim=1).repeat_interleave(3)
    for row, length in zip(out, prompts.tolist()):
        tokens = row[input_ids.shape[1] - length:]  # the prompt without its padding, then the new tokens
        with torch.no_grad():
            logits = model(tokens[None]).logits[0, length - 1 : -1].to(torch.float32)  # before each new token
        kept = torch.stack([torch.isfinite(processor(tokens[None, : length + step], logits[step : step + 1]))[0]
                            for step in range(logits.shape[0])])
        assert kept.gather(1, tokens[length:, None]).all()
        assert (kept.sum(dim=1) < kept.shape[1]).all()


def _tiny_vocab_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, pad_token_id=None, eos_token_id=None, bos_token_id=None)
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    return model


def _exact_probs(model, prefix: torch.Tensor) -> torch.Tensor:  # [rows, n] -> [rows, 8]
    warp = LogitsProcessorList([TemperatureLogitsWarper(WARPERS["temperature"]), TopKLogitsWarper(WARPERS["top_k"]),
                                TopPLogitsWarper(WARPERS["top_p"])])
    with torch.no_grad():
        logits = model(prefix).logits[:, -1].to(torch.float32)
    return warp(prefix, logits).double().softmax(dim=-1)


def test_two_token_frequencies_fit_the_exact_distribution():
    """Joint law of two sampled tokens, p(x1) p(x2 | x1), against 20000 draws: a chi-square test."""
    model, samples = _tiny_vocab_model(), 20000
    prompt = torch.tensor([[3, 1, 4]])
    out = Engine(model).generate(prompt, do_sample=True, max_new_tokens=2, num_return_sequences=samples,
                                 generator=torch.Generator().manual_seed(0), **WARPERS)
    pairs = out[:, 3] * 8 + out[:, 4]
    observed = torch.bincount(pairs, minlength=64).double()
    first = _exact_probs(model, prompt)[0]
    continuations = torch.cat([prompt.expand(8, -1), torch.arange(8)[:, None]], dim=1)
    joint = (first[:, None] * _exact_probs(model, continuations)).flatten()
    assert observed[joint == 0].sum() == 0  # nothing outside the support
    support = joint > 0
    expected = joint[support] * samples
    assert chisquare(observed[support], expected * observed[support].sum() / expected.sum()).pvalue > 1e-3


def test_sampling_goes_through_the_fused_filter_and_reports_transformers_warped_scores(monkeypatch):
    """temperature / top-k / top-p / min-p run as `ops.filter_probs` (not transformers' warpers), and the scores
    a sampled step reports are transformers' own warped scores for that prefix."""
    from specbeam import ops

    model = tiny_model("llama")
    calls = []
    fused = ops.filter_probs
    monkeypatch.setattr(ops, "filter_probs", lambda *a, **k: calls.append(1) or fused(*a, **k))
    prompt = torch.tensor([[5, 9, 11, 3]])
    warpers = dict(temperature=0.7, top_k=6, top_p=0.9, min_p=0.05)
    out = Engine(model).generate(prompt, do_sample=True, max_new_tokens=5, return_dict_in_generate=True,
                                 output_scores=True, generator=torch.Generator().manual_seed(2), **warpers)
    assert calls
    warp = model._get_logits_processor(generation_config=model.generation_config.__class__(do_sample=True, **warpers),
                                       input_ids_seq_length=4, encoder_input_ids=prompt,
                                       logits_processor=LogitsProcessorList(), device="cpu", model_kwargs={})
    for step, scores in enumerate(out.scores):
        prefix = out.sequences[:, : 4 + step]
        with torch.no_grad():
            logits = model(prefix).logits[:, -1].float()
        torch.testing.assert_close(scores, warp(prefix, logits), rtol=1e-5, atol=1e-5)
