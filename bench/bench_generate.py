"""specbeam against transformers' `model.generate` on the same work, both in one run: greedy and beam search 4
on a ~20M-parameter random Llama (64-token prompt, 96 new tokens), and the KV memory of beam search 8 on a
1024-token prompt. `extra_info` records whether the outputs are identical and the memory ratio."""
import pytest
import torch

from models import prompt, random_llama_20m
from specbeam import Engine

MODES = {"greedy": dict(do_sample=False), "beam4": dict(num_beams=4)}


def _run(benchmark, generate, mode: str):
    model = random_llama_20m()
    input_ids = prompt(64)
    benchmark.group = f"generate {mode}"
    with torch.inference_mode():
        out = benchmark.pedantic(lambda: generate(input_ids, max_new_tokens=96, **MODES[mode]),
                                 warmup_rounds=1, rounds=3)
        reference = model.generate(input_ids, max_new_tokens=96, **MODES[mode])
    benchmark.extra_info["identical_to_transformers"] = bool(torch.equal(out, reference))
    benchmark.extra_info["tokens_per_s"] = 96 / benchmark.stats.stats.mean
    return out


@pytest.mark.parametrize("mode", MODES)
def test_transformers_generate(benchmark, mode):
    _run(benchmark, random_llama_20m().generate, mode)


@pytest.mark.parametrize("mode", MODES)
def test_specbeam_generate(benchmark, mode):
    _run(benchmark, Engine(random_llama_20m()).generate, mode)


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def test_kv_memory_beam8_prompt1024(benchmark):
    """KV bytes held by specbeam's paged cache (peak blocks in use) against transformers' cache at the end."""
    model, input_ids = random_llama_20m(), prompt(1024)
    kwargs = dict(num_beams=8, max_new_tokens=16, return_dict_in_generate=True)
    benchmark.group = "kv memory beam8 p1024"
    with torch.inference_mode():
        reference = model.generate(input_ids, **kwargs)
        ours = benchmark.pedantic(lambda: Engine(model).generate(input_ids, **kwargs), rounds=1)
    theirs = _cache_bytes(reference.past_key_values)
    benchmark.extra_info.update(
        specbeam_kv_bytes=ours.stats.kv_bytes_peak, transformers_kv_bytes=theirs,
        ratio=ours.stats.kv_bytes_peak / theirs,
        identical_to_transformers=bool(torch.equal(ours.sequences, reference.sequences)),
    )
    assert ours.stats.kv_bytes_peak <= 0.3 * theirs
