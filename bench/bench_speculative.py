"""The shipped pair (on the GPU where there is one), specbeam against transformers on the same prompt, both in one
run: greedy (transformers plain and assisted), beam search 4 and sampling, each through specbeam plain, speculative
with the draft model and with n-gram prompt lookup. Speculative cases run with the default adaptive depth, and
with the draft at a fixed depth 2 ("-depth2"), which shows what the draft achieves and costs on this machine.
`extra_info`: tokens/s, drafted tokens accepted per drafting round and by depth, identical outputs."""
import functools

import pytest
import torch

from models import DEVICE
from specbeam import Engine, SpecConfig
from specbeam.assets import load_default_pair

PROMPT = '''import os
import sys


def read_lines(path):
    """Return the lines of the file at path, without their line endings."""
    with open(path) as f:
'''
NEW_TOKENS = 96
MODES = {"greedy": dict(do_sample=False), "beam4": dict(num_beams=4), "sample": dict(do_sample=True, top_k=0)}


@functools.cache
def pair():
    target, draft, tokenizer = load_default_pair()
    return target.to(DEVICE), draft.to(DEVICE), tokenizer(PROMPT, return_tensors="pt").input_ids.to(DEVICE)


@functools.cache
def reference(mode: str) -> torch.Tensor:
    target, _, input_ids = pair()
    with torch.inference_mode():
        return target.generate(input_ids, max_new_tokens=NEW_TOKENS, **MODES[mode])


def _generator(side: str):
    target, draft, _ = pair()
    return {
        "transformers": target.generate,
        "transformers-assisted": functools.partial(target.generate, assistant_model=draft),
        "specbeam": Engine(target).generate,
        "specbeam-speculative": Engine(target, draft_model=draft).generate,
        "specbeam-speculative-depth2": Engine(target, draft_model=draft,
                                              spec=SpecConfig(depth=2, adaptive=False)).generate,
        "specbeam-ngram": Engine(target, draft_model="ngram").generate,
    }[side]


SPECBEAM_SIDES = ["specbeam", "specbeam-speculative", "specbeam-speculative-depth2", "specbeam-ngram"]
SIDES = {"greedy": ["transformers", "transformers-assisted", *SPECBEAM_SIDES],
         "beam4": ["transformers", *SPECBEAM_SIDES],
         "sample": ["transformers", *SPECBEAM_SIDES]}
CASES = [(mode, side) for mode, sides in SIDES.items() for side in sides]


@pytest.mark.parametrize("mode, side", CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_generate(benchmark, mode, side):
    _, _, input_ids = pair()
    generate = _generator(side)
    torch.manual_seed(0)
    kwargs = dict(max_new_tokens=NEW_TOKENS, return_dict_in_generate=True, **MODES[mode])
    benchmark.group = f"pair {mode}"
    with torch.inference_mode():
        out = benchmark.pedantic(lambda: generate(input_ids, **kwargs), warmup_rounds=1, rounds=3)
    new_tokens = out.sequences.shape[1] - input_ids.shape[1]
    benchmark.extra_info.update(mode=mode, side=side, tokens_per_s=new_tokens / benchmark.stats.stats.mean)
    if mode != "sample":
        benchmark.extra_info["identical_to_transformers"] = bool(torch.equal(out.sequences, reference(mode)))
    stats = getattr(out, "stats", None)
    if stats is not None:
        benchmark.extra_info.update(target_passes=stats.target_passes, draft_passes=stats.draft_passes)
    if stats is not None and stats.rounds:
        benchmark.extra_info.update(accepted_per_round=stats.mean_accepted(),
                                    acceptance_by_depth=stats.acceptance_by_depth())
