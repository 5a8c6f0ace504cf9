"""At scale (issue 17, item 1): a Llama-shaped target of ~246M parameters built from its config (vocab 32000,
hidden 1024, 16 layers, 16 heads, 4 KV heads, intermediate 2816; random weights, seed 0), and a draft that
agrees with it at a controlled rate: the target's layers 1.. have their output projections (o_proj, down_proj)
scaled by LATER_LAYER_SCALE, so that the residual stream is dominated by the embeddings and layer 0, and the
draft is the target's first DRAFT_LAYERS layers with its embeddings, final norm and lm_head. The draft's greedy
agreement (how often its argmax is the target's next greedy token, along the target's own continuations) is
measured and recorded as `draft_agreement`.

Cases, specbeam against transformers in one run, 96 new tokens after a 64-token prompt, one timed round after a
warm-up, torch.set_num_threads(THREADS): greedy (transformers plain and assisted, specbeam plain, speculative at
the default adaptive tree, with the draft read in bfloat16 or int8 (`SpecConfig(draft_weights=...)`) and at a
fixed depth 3, n-gram prompt lookup, a 4-layer draft alone, and the cascade of the 1-layer and the 4-layer
drafts, as stored and in int8), sampling and beam search 4 (plain, speculative, speculative with the draft read in bfloat16 or int8),
all in float32; greedy again with bfloat16-exact weights (every weight rounded through bfloat16, held in float32:
specbeam's C++ linear then streams half the bytes, losslessly, `specbeam/linear_weight.py`).
`extra_info`: tokens/s, target and draft passes per call (forward hooks count transformers' calls), accepted
drafted tokens per round, identical_to_transformers (greedy and beam).

The pass-cost curve ("pass cost" groups): one target forward through the engine's model runner of k = 1 .. 32 new
causal tokens after a cached 64-token prompt, each scored; `t_over_t1` = median T(k) / median T(1)."""
import copy
import functools

import pytest
import torch
from models import DEVICE, prompt, random_llama
from transformers import LlamaForCausalLM

from specbeam import Engine, SpecConfig
from specbeam.cache import BlockTable
from specbeam.model_runner import Work

THREADS = 2
torch.set_num_threads(THREADS)

NEW_TOKENS = 96
PROMPT_LENGTH = 64
SHAPE = dict(vocab=32000, hidden=1024, intermediate=2816, layers=16, heads=16, kv_heads=4)
LATER_LAYER_SCALE = 0.03  # o_proj and down_proj of layers 1.. (draft agreement ~0.7; 0.01: 0.86, 0.05: 0.46)
DRAFT_LAYERS = 1
MID_LAYERS = 4  # the larger draft of the cascade cases
AGREEMENT_PROMPTS = 3  # prompts (seeds 0, 1, 2) whose greedy continuations measure the draft's agreement
PASS_TOKENS = [1, 2, 4, 8, 16, 32]
MODES = {"greedy": dict(do_sample=False), "beam4": dict(num_beams=4), "sample": dict(do_sample=True, top_k=0)}


def draft_of(target: LlamaForCausalLM, layers: int = DRAFT_LAYERS) -> LlamaForCausalLM:
    """The target's embeddings, first `layers` layers, final norm and lm_head, as a model of its own."""
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = layers
    draft = LlamaForCausalLM(config).eval().to(DEVICE)
    keep = {k: v for k, v in target.state_dict().items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    draft.load_state_dict(keep)
    return draft


def scaled_target(shape: dict) -> LlamaForCausalLM:
    """A random Llama of this shape whose layers 1.. write little into the residual stream: their o_proj and
    down_proj scaled by LATER_LAYER_SCALE, so that a draft of its first layer agrees with it often."""
    target = random_llama(*shape.values())
    with torch.no_grad():
        for layer in target.model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(LATER_LAYER_SCALE)
            layer.mlp.down_proj.weight.mul_(LATER_LAYER_SCALE)
    return target


@functools.cache
def models(weights: str) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """(target, draft) with "fp32" random weights, or the same rounded through bfloat16 ("bf16-exact")."""
    if weights == "fp32":
        target = scaled_target(SHAPE)
    else:
        target = copy.deepcopy(models("fp32")[0])
        with torch.no_grad():
            for w in target.parameters():
                w.copy_(w.bfloat16().float())
    return target, draft_of(target)


@functools.cache
def mid_draft(weights: str) -> LlamaForCausalLM:
    """The cascade's larger stage: the target's first MID_LAYERS layers."""
    return draft_of(models(weights)[0], MID_LAYERS)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@functools.cache
def input_ids(seed: int = 0) -> torch.Tensor:  # [1, PROMPT_LENGTH]
    return prompt(PROMPT_LENGTH, seed=seed)


_outputs: dict[tuple[str, str], torch.Tensor] = {}  # (weights, mode) -> transformers' sequences


def reference(weights: str, mode: str) -> torch.Tensor:
    if (weights, mode) not in _outputs:
        with torch.inference_mode():
            _outputs[weights, mode] = models(weights)[0].generate(input_ids(), max_new_tokens=NEW_TOKENS,
                                                                   **MODES[mode])
    return _outputs[weights, mode]


@functools.cache
def draft_agreement(weights: str) -> float:
    """How often the draft's argmax is the target's greedy next token, along the target's greedy continuations of
    AGREEMENT_PROMPTS prompts (teacher-forced: the draft sees the target's prefix)."""
    target, draft = models(weights)
    same = total = 0
    with torch.inference_mode():
        for seed in range(AGREEMENT_PROMPTS):
            ids = input_ids(seed)
            seq = reference(weights, "greedy") if seed == 0 else target.generate(ids, max_new_tokens=NEW_TOKENS)
            rows = slice(ids.shape[1] - 1, seq.shape[1] - 1)
            wanted = seq[0, ids.shape[1]:]
            same += int((draft(seq).logits[0, rows].argmax(-1) == wanted).sum())
            total += wanted.numel()
    return same / total


class _Passes:
    """Counts a module's forward calls (transformers' passes; specbeam's lean decoder does not call the module)."""

    def __init__(self, module):
        self.count = 0
        self.handle = module.register_forward_hook(lambda *_: setattr(self, "count", self.count + 1))


def _generator(side: str, weights: str):
    target, draft = models(weights)
    return {
        "transformers": lambda: target.generate,
        "transformers-assisted": lambda: functools.partial(target.generate, assistant_model=draft),
        "specbeam": lambda: Engine(target).generate,
        "specbeam-speculative": lambda: Engine(target, draft_model=draft).generate,
        "specbeam-speculative-bf16-draft": lambda: Engine(target, draft_model=draft,
                                                          spec=SpecConfig(draft_weights="bfloat16")).generate,
        "specbeam-speculative-int8-draft": lambda: Engine(target, draft_model=draft,
                                                          spec=SpecConfig(draft_weights="int8")).generate,
        "specbeam-speculative-depth3": lambda: Engine(target, draft_model=draft,
                                                      spec=SpecConfig(depth=3, adaptive=False)).generate,
        "specbeam-ngram": lambda: Engine(target, draft_model="ngram").generate,
        "specbeam-speculative-4-layers": lambda: Engine(target, draft_model=mid_draft(weights)).generate,
        "specbeam-cascade-1-4-layers": lambda: Engine(target, draft_model=[draft, mid_draft(weights)]).generate,
        "specbeam-cascade-1-4-layers-int8": lambda: Engine(target, draft_model=[draft, mid_draft(weights)],
                                                           spec=SpecConfig(draft_weights="int8")).generate,
    }[side]()


SPECULATIVE = ["specbeam-speculative", "specbeam-speculative-bf16-draft", "specbeam-speculative-int8-draft"]
SIDES = {("fp32", "greedy"): ["transformers", "transformers-assisted", "specbeam", *SPECULATIVE,
                              "specbeam-speculative-depth3", "specbeam-ngram", "specbeam-speculative-4-layers",
                              "specbeam-cascade-1-4-layers", "specbeam-cascade-1-4-layers-int8"],
         ("fp32", "sample"): ["transformers", "specbeam", *SPECULATIVE],
         ("fp32", "beam4"): ["transformers", "specbeam", *SPECULATIVE],
         ("bf16-exact", "greedy"): ["transformers", "transformers-assisted", "specbeam", "specbeam-speculative",
                                    "specbeam-speculative-int8-draft", "specbeam-speculative-depth3"]}
CASES = [(weights, mode, side) for (weights, mode), sides in SIDES.items() for side in sides]


@pytest.mark.parametrize("weights, mode, side", CASES, ids=[f"{w}-{m}-{s}" for w, m, s in CASES])
def test_generate(benchmark, weights, mode, side):
    target, draft = models(weights)
    generate, ids = _generator(side, weights), input_ids()
    kwargs = dict(max_new_tokens=NEW_TOKENS, return_dict_in_generate=True, **MODES[mode])
    benchmark.group = f"scale {mode} {weights}"
    target_passes, draft_passes = _Passes(target), _Passes(draft)
    torch.manual_seed(0)
    try:
        with torch.inference_mode():
            out = benchmark.pedantic(lambda: generate(ids, **kwargs), warmup_rounds=1, rounds=1)
    finally:
        target_passes.handle.remove()
        draft_passes.handle.remove()
    new_tokens = out.sequences.shape[1] - ids.shape[1]
    benchmark.extra_info.update(mode=mode, side=side, tokens_per_s=new_tokens / benchmark.stats.stats.mean)
    if side == "transformers" and mode != "sample":
        _outputs.setdefault((weights, mode), out.sequences)
    if mode != "sample":
        benchmark.extra_info["identical_to_transformers"] = bool(torch.equal(out.sequences, reference(weights, mode)))
    stats = getattr(out, "stats", None)
    if stats is not None:
        benchmark.extra_info.update(target_passes=stats.target_passes, draft_passes=stats.draft_passes)
    else:  # transformers: the hooks saw the warm-up and the round
        benchmark.extra_info["target_passes"] = target_passes.count / 2
        if draft_passes.count:
            benchmark.extra_info["draft_passes"] = draft_passes.count / 2
    if stats is not None and stats.rounds:
        benchmark.extra_info.update(accepted_per_round=stats.mean_accepted(),
                                    acceptance_by_depth=stats.acceptance_by_depth())
    if stats is not None and stats.stage_passes:
        benchmark.extra_info["stage_passes"] = stats.stage_passes
    if side in ("transformers-assisted", *SPECULATIVE, "specbeam-speculative-depth3"):
        benchmark.extra_info["draft_agreement"] = draft_agreement(weights)


_pass_medians: dict[tuple[str, int], float] = {}  # (weights, k) -> median seconds


@functools.cache
def _prefilled(weights: str):
    """An engine's runner, its cache and a table holding the 64-token prompt's K/V."""
    engine = Engine(models(weights)[0])
    cache = engine.runner.new_cache(8, 16)  # 128 positions: the prompt and 32 new tokens fit
    table = BlockTable()
    with torch.inference_mode():
        engine.runner.forward(cache, [Work(table, input_ids()[0].tolist(), num_logits=0)])
    return engine.runner, cache, table


@pytest.mark.parametrize("weights", ["fp32", "bf16-exact"])
@pytest.mark.parametrize("k", PASS_TOKENS)
def test_pass_cost(benchmark, weights, k):
    runner, cache, table = _prefilled(weights)
    length = table.length
    tokens = prompt(k, seed=100 + k)[0].tolist()

    def one_pass():
        logits = runner.forward(cache, [Work(table, tokens, num_logits=k)])
        cache.truncate(table, length)
        return logits

    benchmark.group = f"pass cost {weights}"
    with torch.inference_mode():
        logits = benchmark.pedantic(one_pass, warmup_rounds=1, rounds=5)
    assert logits.shape[0] == k
    median = benchmark.stats.stats.median
    _pass_medians[weights, k] = median
    benchmark.extra_info.update(new_tokens=k, ms_per_pass=1e3 * median)
    if k == 1:
        benchmark.extra_info["target_parameters"] = parameter_count(models(weights)[0])
    elif (weights, 1) in _pass_medians:
        benchmark.extra_info["t_over_t1"] = median / _pass_medians[weights, 1]
