"""The engine's own work and its batching (issue "One engine loop ..."): per-step overhead on a model whose
forward costs almost nothing, the rounds that beam search over a batch needs with a perfect draft, and what
many callers gain from sharing the target's forwards. `extra_info` records ms per step / round and ratios."""
import copy
import threading

import pytest
import torch
from models import DEVICE, one_layer_llama
from specbeam import Engine, SpecConfig
from specbeam.assets import load_default_pair

NEW_TOKENS = 256


def _prompts(batch: int) -> torch.Tensor:  # [batch, 8]
    return torch.randint(2, 512, (batch, 8), generator=torch.Generator().manual_seed(batch)).to(DEVICE)


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


def _threads(engine: Engine, calls: list[dict]) -> None:
    """Every call from its own thread, all at once."""
    threads = [threading.Thread(target=engine.generate, kwargs=call) for call in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _steps(engine: Engine, calls: list[dict]) -> None:
    """Every call added to the step API at once, stepped to the end."""
    for call in calls:
        engine.add_request(**call)
    while engine.has_unfinished_requests():
        engine.step()


@pytest.mark.parametrize("count, together", [(8, _threads), (64, _steps)], ids=["8-threads", "64-step-api"])
@pytest.mark.parametrize("how", ["one after another", "together"])
def test_many_callers_on_the_shipped_pair(benchmark, count, together, how):
    target, draft, _ = load_default_pair()
    engine, calls = Engine(target, draft_model=draft), _pair_calls(count)
    benchmark.group = f"{count} requests, shipped pair"
    if how == "together":
        benchmark.pedantic(together, args=(engine, calls), warmup_rounds=1, rounds=3)
    else:
        benchmark.pedantic(lambda: [engine.generate(**c) for c in calls], warmup_rounds=1, rounds=3)
    benchmark.extra_info["requests_per_s"] = count / benchmark.stats.stats.median
