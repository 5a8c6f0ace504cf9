"""The engine's own work and its batching (issue "One engine loop ..."): per-step overhead on a model whose
forward costs almost nothing, the rounds that beam search over a batch needs with a perfect draft, and what
many callers gain from sharing the target's forwards. `extra_info` records ms per step / round and ratios."""
import copy
import functools
import threading
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specbeam import Engine, SpecConfig
from specbeam.assets import load_default_pair

NEW_TOKENS = 256


@functools.cache
def one_layer_llama() -> LlamaForCausalLM:
    """1 layer, hidden 16: the forward costs almost nothing, so the time is the engine's own."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         eos_token_id=None, pad_token_id=0, bos_token_id=1)
    return LlamaForCausalLM(config).eval()


def _prompts(batch: int) -> torch.Tensor:  # [batch, 8]
    return torch.randint(2, 512, (batch, 8), generator=torch.Generator().manual_seed(batch))


OVERHEAD = {
    "greedy-b1": (dict(), 1), "beam4-b16": (dict(num_beams=4), 16),
}


@pytest.mark.parametrize("case", OVERHEAD)
@pytest.mark.parametrize("who", ["transformers", "specbeam"])
def test_plain_step_overhead(benchmark, case, who):
    mode, batch = OVERHEAD[case]
    model = one_layer_llama()
    generate = model.generate if who == "transformers" else Engine(model).generate
    ids = _prompts(batch)
    benchmark.group = f"engine overhead: plain {case}"
    with torch.inference_mode():
        benchmark.pedantic(lambda: generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **mode),
                           warmup_rounds=1, rounds=3)
    benchmark.extra_info["ms_per_step"] = 1e3 * benchmark.stats.stats.median / NEW_TOKENS


@pytest.mark.parametrize("case", OVERHEAD)
def test_speculative_round_overhead(benchmark, case):
    """A perfect draft (the target itself) at a fixed depth 4."""
    mode, batch = OVERHEAD[case]
    model = one_layer_llama()
    engine = Engine(model, draft_model=copy.deepcopy(model), spec=SpecConfig(depth=4, adaptive=False))
    ids = _prompts(batch)
    benchmark.group = f"engine overhead: speculative {case}"
    out = benchmark.pedantic(lambda: engine.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                                     return_dict_in_generate=True, **mode), warmup_rounds=1, rounds=3)
    rounds = out.stats.target_passes - 1  # after the prefill
    benchmark.extra_info.update(rounds=rounds, steps=out.stats.steps,
                                ms_per_round=1e3 * benchmark.stats.stats.median / rounds)


def _pair_calls(count: int) -> list[dict]:
    _, _, tokenizer = load_default_pair()
    texts = ["def fib(n):", "import os\n", "class Stack:", "for i in range(", "    return sorted(",
             "with open(path) as f:", "if __name__ ==", "def parse(line):"]
    modes = [dict(), dict(num_beams=4), dict(do_sample=True, top_k=20), dict(repetition_penalty=1.2)]
    return [dict(input_ids=tokenizer(texts[i % len(texts)], return_tensors="pt").input_ids, max_new_tokens=32,
                 **modes[i % len(modes)]) for i in range(count)]


@pytest.mark.parametrize("how", ["sequential", "concurrent"])
def test_eight_callers_on_the_shipped_pair(benchmark, how):
    target, draft, _ = load_default_pair()
    engine, calls = Engine(target, draft_model=draft), _pair_calls(8)

    def sequential():
        for call in calls:
            engine.generate(**call)

    def concurrent():
        threads = [threading.Thread(target=engine.generate, kwargs=call) for call in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    benchmark.group = "8 callers, shipped pair"
    benchmark.pedantic(sequential if how == "sequential" else concurrent, warmup_rounds=1, rounds=3)


@pytest.mark.parametrize("how", ["sequential generate", "step API"])
def test_64_requests_on_the_shipped_pair(benchmark, how):
    target, draft, _ = load_default_pair()
    engine, calls = Engine(target, draft_model=draft), _pair_calls(64)

    def through_steps():
        for call in calls:
            engine.add_request(**call)
        tokens = 0
        while engine.has_unfinished_requests():
            tokens += sum(len(t) for out in engine.step() for t in out.new_token_ids)
        return tokens

    benchmark.group = "64 requests, shipped pair"
    if how == "step API":
        benchmark.pedantic(through_steps, warmup_rounds=1, rounds=3)
    else:
        benchmark.pedantic(lambda: [engine.generate(**c) for c in calls], warmup_rounds=1, rounds=3)
    benchmark.extra_info["requests_per_s"] = 64 / benchmark.stats.stats.median
