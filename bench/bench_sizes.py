"""Tokens/s against model size (issue 17): greedy decoding by transformers, specbeam plain and specbeam
speculative, for the shipped pair's target (8.7M parameters, with its shipped draft), a ~55M and the ~246M Llama of
`bench_scale.py` (each with a draft of its own first layer), the drafts read in int8, 96 new tokens, 2 threads, one
timed call after a warm-up. `python bench/report.py run.json --sizes-png bench/sizes.png` draws the chart."""
import functools
import json

import pytest
import torch
from bench_scale import NEW_TOKENS, SHAPE, THREADS, draft_of, parameter_count, scaled_target
from models import prompt

from specbeam import Engine, SpecConfig
from specbeam.assets import load_default_pair
from specbeam.cli.evaluate import SHIPPED_PROMPTS

torch.set_num_threads(THREADS)

SIZES = {"pair": None, "55M": dict(vocab=32000, hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=2),
         "246M": SHAPE}
SIDES = ["transformers", "specbeam", "specbeam-speculative"]


@functools.cache
def work(size: str) -> tuple:
    """(target, draft, input_ids [1, L]): the shipped pair on a shipped code prompt, or a first-layer draft of a
    scaled random target on a 64-token random prompt."""
    if SIZES[size] is None:
        target, draft, tokenizer = load_default_pair()
        text = json.loads(SHIPPED_PROMPTS.read_text().splitlines()[0])["prompt"]
        return target, draft, tokenizer(text, return_tensors="pt").input_ids
    target = scaled_target(SIZES[size])
    return target, draft_of(target), prompt(64)


def _generate(side: str, target, draft):
    if side == "transformers":
        return target.generate
    if side == "specbeam":
        return Engine(target).generate
    return Engine(target, draft_model=draft, spec=SpecConfig(draft_weights="int8")).generate


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("side", SIDES)
def test_greedy(benchmark, size, side):
    target, draft, ids = work(size)
    generate = _generate(side, target, draft)
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    benchmark.group = f"sizes {size}"
    with torch.inference_mode():
        out = benchmark.pedantic(lambda: generate(ids, **kwargs), warmup_rounds=1, rounds=1)
        reference = target.generate(ids, **kwargs) if side != "transformers" else out
    benchmark.extra_info.update(side=side, parameters=parameter_count(target),
                                tokens_per_s=NEW_TOKENS / benchmark.stats.stats.mean,
                                identical_to_transformers=bool(torch.equal(out, reference)))
