"""The shipped target/draft pair and the cascade's middle stage: load offline, sizes and costs as documented,
usable for generation."""
import json

import pytest
import torch

from specbeam import Engine
from specbeam.assets import PAIR_DIR, load_default_cascade, load_default_pair

CODE = 'def mean(xs: list[float]) -> float:\n\t"""Arithmetic mean; é ≠ e."""\n    return sum(xs) / len(xs)  # O(n)\n'


@pytest.fixture(scope="module")
def pair():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield load_default_pair()


def flops_per_token(model) -> int:
    """Forward FLOPs per token ~ 2 x (non-embedding parameters + lm_head parameters)."""
    params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return 2 * (params - embedding + model.get_output_embeddings().weight.numel())


def test_loads_in_eval_mode_as_float32(pair):
    target, draft, _ = pair
    for model in (target, draft):
        assert not model.training
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_target_has_at_least_8m_parameters(pair):
    target, _, _ = pair
    assert sum(p.numel() for p in target.parameters()) >= 8_000_000


def test_same_vocabulary_and_special_tokens(pair):
    target, draft, tokenizer = pair
    assert target.config.vocab_size == draft.config.vocab_size == len(tokenizer)
    for model in (target, draft):
        gen = model.generation_config
        assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (
            tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        )
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_draft_costs_at_most_a_fifth_of_the_target(pair):
    target, draft, _ = pair
    ratio = flops_per_token(draft) / flops_per_token(target)
    assert ratio <= 0.2
    assert ratio == pytest.approx(json.loads((PAIR_DIR / "metrics.json").read_text())["cost_ratio"], abs=1e-4)


def test_tokenizer_round_trips_code(pair):
    _, _, tokenizer = pair
    ids = tokenizer.encode(CODE, add_special_tokens=False)
    assert tokenizer.decode(ids) == CODE
    assert len(ids) < len(CODE.encode()) / 2  # BPE merges bytes: well under one token per byte


def test_greedy_generate_gives_valid_ids(pair):
    target, _, tokenizer = pair
    prompt = tokenizer("import os\n\n\ndef ", return_tensors="pt")
    out = target.generate(**prompt, max_new_tokens=16, do_sample=False)
    assert out.shape[0] == 1 and prompt.input_ids.shape[1] < out.shape[1] <= prompt.input_ids.shape[1] + 16
    assert torch.equal(out[:, : prompt.input_ids.shape[1]], prompt.input_ids)
    assert 0 <= out.min() and out.max() < len(tokenizer)


def test_assets_fit_in_30_mb():
    assert sum(f.stat().st_size for f in PAIR_DIR.rglob("*") if f.is_file()) <= 30_000_000


def test_the_middle_stage_sits_between_the_draft_and_the_target(pair):
    """By cost, the middle stage sits between the draft and the target; both drafts agree with the target on at
    least 0.7 of the positions of Python code that is not the standard library's (issue 13's goal)."""
    target, (draft, mid), tokenizer = load_default_cascade()
    assert mid.config.vocab_size == target.config.vocab_size and not mid.training
    assert flops_per_token(draft) < flops_per_token(mid) <= 0.5 * flops_per_token(target)
    foreign = json.loads((PAIR_DIR / "metrics.json").read_text())["foreign_code"]
    assert foreign["draft_greedy_agreement"] >= 0.7 and foreign["mid_greedy_agreement"] >= 0.7
    prompt = tokenizer("import os\n\n\ndef ", return_tensors="pt")
    out = Engine(target, draft_model=[draft, mid]).generate(**prompt, max_new_tokens=16, do_sample=False)
    assert torch.equal(out, target.generate(**prompt, max_new_tokens=16, do_sample=False))
