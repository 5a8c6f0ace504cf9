"""The lean decoder stands in for the forward of Llama, Mistral and Qwen2: the same logits as the model's own
forward through specbeam's attention (float64), so every parity test of the engine runs through it. Other
models, and `lean_decoder=False`, run their own forward. A float32 model whose weights bfloat16 holds exactly
runs on their bfloat16 copies, with the same bits."""
import copy
import random

import pytest
import torch

from specbeam import Engine, linear_weight, ops
from specbeam.cache import BlockTable
from specbeam.config import SpecConfig
from specbeam.lean_decoder import unsupported_reason
from specbeam.model_runner import Work, _pack_tree_masks
from specbeam.reference import decoder as reference_decoder
from tiny_models import left_padded_batch, tiny_model


@torch.no_grad()
def _packed_forward_logits(engine: Engine, tokens: list[torch.Tensor]) -> torch.Tensor:
    """Prefill each sequence, then score a 3-node tree on each: every row of every token."""
    runner, cache = engine.runner, engine.runner.new_cache(num_blocks=32, block_size=4)
    tables = [BlockTable() for _ in tokens]
    runner.forward(cache, [Work(table, t.tolist(), 1) for table, t in zip(tables, tokens)])
    new = [[5, 9, 11], [7, 8, 3]]  # a root and its two children
    return runner.forward(cache, [Work(table, t, 3, [0, 1, 1], [-1, 0, 0]) for table, t in zip(tables, new)])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_lean_logits_equal_the_models_own_forward(arch):
    model = tiny_model(arch)
    lean, own = Engine(model), Engine(model, lean_decoder=False)
    assert lean.runner.lean is not None and own.runner.lean is None
    prompts = [torch.tensor([3, 14, 15, 92, 65]), torch.tensor([35, 89])]
    torch.testing.assert_close(_packed_forward_logits(lean, prompts), _packed_forward_logits(own, prompts),
                               rtol=1e-12, atol=1e-12)


@torch.no_grad()
def _prefill_logits(engine: Engine, tokens: list[torch.Tensor]) -> torch.Tensor:  # every row of every token
    cache = engine.runner.new_cache(num_blocks=64, block_size=4)
    return engine.runner.forward(cache, [Work(BlockTable(), t.tolist(), len(t)) for t in tokens])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("lengths", [(5, 2), (12, 11), (70, 64)])
@pytest.mark.parametrize("backend", [None, "reference"], ids=["cpu-default", "reference"])
def test_lean_prefill_equals_the_models_own_forward(arch, lengths, backend):
    """The CPU's own attention (C++ where built) and the reference (prompts with nothing cached: one causal
    attention each) give the model's own forward."""
    model = tiny_model(arch)
    prompts = [torch.arange(3, 3 + n) for n in lengths]
    torch.testing.assert_close(_prefill_logits(Engine(model, attention_backend=backend), prompts),
                               _prefill_logits(Engine(model, lean_decoder=False), prompts), rtol=1e-12, atol=1e-12)


def test_other_models_run_their_own_forward():
    model = tiny_model("gpt2")
    assert "GPT2LMHeadModel" in unsupported_reason(model)
    assert Engine(model).runner.lean is None


def test_lean_decoder_option_is_checked():
    with pytest.raises(TypeError, match="lean_decoder"):
        Engine(tiny_model("llama"), lean_decoder="yes")


def _layer_args(dtype, bias: bool, tokens=5, hidden=24, heads=4, kv_heads=2, head_dim=6, inter=40):
    gen = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    def proj(out, inp):
        return rand(out, inp), rand(out) if bias else None

    angles = rand(tokens, head_dim)
    before = (rand(hidden), 1e-5, *proj(heads * head_dim, hidden), *proj(kv_heads * head_dim, hidden),
              *proj(kv_heads * head_dim, hidden), angles.cos(), angles.sin(), head_dim)
    after = (*proj(hidden, heads * head_dim), rand(hidden), 1e-5, *proj(inter, hidden), *proj(inter, hidden),
             *proj(hidden, inter))
    return rand(tokens, hidden), rand(tokens, heads * head_dim), before, after


needs_cpp = pytest.mark.skipif(ops._load_cpp()[0] is None, reason="specbeam._C is not built")
# the same trees in both runs: the adaptive depth follows wall time, and on the CPU a pass of several new
# tokens may attend through SDPA, one of one token through the C++ kernel (equal to float tolerance, not bits)
FIXED_DEPTH = SpecConfig(adaptive=False)


@needs_cpp
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_layer_halves_match_the_reference(dtype, bias):
    hidden, attention, before, after = _layer_args(dtype, bias)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    ours = ops.attention_inputs(hidden, *before, backend="cpp")
    reference = ops.attention_inputs(hidden, *before, backend="reference")
    assert [t.shape for t in ours] == [(5, 4, 6), (5, 2, 6), (5, 2, 6)]
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, **tolerance)
    torch.testing.assert_close(ops.mlp_block(hidden, attention, *after, backend="cpp"),
                               ops.mlp_block(hidden, attention, *after, backend="reference"), **tolerance)


@needs_cpp
def test_cpp_layer_halves_are_batch_invariant():
    """A token's outputs are bitwise the same alone or among others: what makes speculation exact in float32."""
    hidden, attention, before, after = _layer_args(torch.float32, True)
    together = ops.attention_inputs(hidden, *before, backend="cpp")
    mixed = ops.mlp_block(hidden, attention, *after, backend="cpp")
    for i in range(hidden.shape[0]):
        cos, sin = before[-3][i:i + 1], before[-2][i:i + 1]
        alone = ops.attention_inputs(hidden[i:i + 1], *before[:-3], cos, sin, before[-1], backend="cpp")
        assert all(torch.equal(a[0], b[i]) for a, b in zip(alone, together))
        assert torch.equal(ops.mlp_block(hidden[i:i + 1], attention[i:i + 1], *after, backend="cpp")[0], mixed[i])


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_activation_gives_a_row_the_same_bits_wherever_a_threads_range_starts(dtype):
    """The MLP's activation runs in parallel over all the rows' elements, its exp vectorised
    (csrc/kernels/fast_exp.h): with 501 rows of 45 the second thread's range starts inside a row and inside a
    vector, and each row is still bitwise the row alone; against torch's silu, to float tolerance."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        hidden, attention, _, after = _layer_args(dtype, False, tokens=501, inter=45)
        together = ops.mlp_block(hidden, attention, *after, backend="cpp")
        for i in (0, 249, 250, 251, 500):
            assert torch.equal(ops.mlp_block(hidden[i:i + 1], attention[i:i + 1], *after, backend="cpp")[0],
                               together[i]), i
        tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(together, ops.mlp_block(hidden, attention, *after, backend="reference"),
                                   **tolerance)
    finally:
        torch.set_num_threads(before)


@needs_cpp
def test_cpp_layer_halves_name_bad_arguments():
    hidden, attention, before, after = _layer_args(torch.float32, False)
    with pytest.raises(ValueError, match="q_weight"):
        ops.attention_inputs(hidden[:, :7], *before, backend="cpp")
    with pytest.raises(ValueError, match="cos and sin"):
        ops.attention_inputs(hidden, *before[:-3], before[-3][:2], before[-2], before[-1], backend="cpp")
    with pytest.raises(TypeError, match="hidden"):
        ops.mlp_block(hidden.int(), attention, *after, backend="cpp")
    with pytest.raises(ValueError, match="head_dim"):
        ops.attention_inputs(hidden, *before[:-1], 5, backend="cpp")
    with pytest.raises(ValueError, match="norm_weight"):
        ops.attention_inputs(hidden, before[0][:-1], *before[1:], backend="cpp")
    with pytest.raises(ValueError, match="down_weight"):
        ops.mlp_block(hidden, attention, *after[:-2], after[-2][:, :-1], after[-1], backend="cpp")
    with pytest.raises(ValueError, match="attention"):
        ops.mlp_block(hidden, attention[:-1], *after, backend="cpp")


def _float32_llama(bfloat16_exact: bool):
    """tiny_model("llama") in float32, every weight rounded through bfloat16 when bfloat16_exact."""
    model = copy.deepcopy(tiny_model("llama")).float()
    if bfloat16_exact:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(parameter.to(torch.bfloat16).float())
    return model


def _linear_weights(engine: Engine) -> list[torch.Tensor]:
    lean = engine.runner.lean
    layers = [(before[2], before[4], before[6], after[0], after[4], after[6], after[8]) for before, after in lean.layers]
    return [w for layer in layers for w in layer] + [lean.head_weight]


def _model_weights(model) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]


@needs_cpp
def test_bfloat16_exact_weights_are_read_as_bfloat16(monkeypatch):
    model = _float32_llama(bfloat16_exact=True)
    assert {w.dtype for w in _linear_weights(Engine(model))} == {torch.bfloat16}
    monkeypatch.setattr(linear_weight, "bfloat16_if_exact", lambda weight: weight)
    ours = _linear_weights(Engine(model))
    assert {w.dtype for w in ours} == {torch.float32}
    assert all(torch.equal(w, linear_weight.pack(m)) for w, m in zip(ours, _model_weights(model)))


def test_the_torch_backends_read_the_model_weights_as_they_are(monkeypatch):
    monkeypatch.setattr(ops, "_load_cpp", lambda: (None, "not built"))
    model = _float32_llama(bfloat16_exact=True)
    assert all(w is m for w, m in zip(_linear_weights(Engine(model)), _model_weights(model)))


def test_bfloat16_if_exact_only_when_lossless():
    exact = torch.randn(6, 5).to(torch.bfloat16).float()
    compact = linear_weight.bfloat16_if_exact(exact)
    assert compact.dtype == torch.bfloat16 and torch.equal(compact.float(), exact)
    inexact = exact.clone()
    inexact[3, 2] = torch.nextafter(inexact[3, 2], torch.tensor(2.0))  # one element off the bfloat16 grid
    for weight in (inexact, exact.double(), _float32_llama(bfloat16_exact=False).lm_head.weight):
        assert linear_weight.bfloat16_if_exact(weight) is weight


@needs_cpp
@pytest.mark.parametrize("draft", [None, "ngram"])
def test_bfloat16_weights_give_the_same_tokens_and_logits(monkeypatch, draft):
    """Greedy tokens and every logit bitwise the same with the weights read as bfloat16 as with float32."""
    model = _float32_llama(bfloat16_exact=True)
    input_ids, attention_mask = left_padded_batch()
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=12, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    compact = Engine(model, draft, spec=FIXED_DEPTH).generate(input_ids, **kwargs)
    monkeypatch.setattr(linear_weight, "bfloat16_if_exact", lambda weight: weight)
    full = Engine(model, draft, spec=FIXED_DEPTH).generate(input_ids, **kwargs)
    assert torch.equal(compact.sequences, full.sequences)
    assert len(compact.logits) == len(full.logits) == 12
    for ours, theirs in zip(compact.logits, full.logits):
        assert ours.dtype == torch.float32 and torch.equal(ours, theirs)


def test_bfloat16_models_take_the_reference_layers():
    """The C++ layer halves take float32 / float64: a bfloat16 model runs the reference's torch ops, on its own
    weights, and its logits are its own forward's to bfloat16 precision."""
    model = copy.deepcopy(tiny_model("llama")).to(torch.bfloat16)
    lean = Engine(model)
    assert lean.runner.lean.ops is reference_decoder and lean.runner.lean.head_weight is model.lm_head.weight
    prompts = [torch.arange(3, 8), torch.arange(20, 22)]
    ours, own = _prefill_logits(lean, prompts), _prefill_logits(Engine(model, lean_decoder=False), prompts)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), own.float(), rtol=2e-2, atol=2e-2)


def test_packed_tree_masks_are_each_tokens_ancestors_and_itself():
    """One mask for every work of a forward, built level by level: trees, causal chains and a chain with a tree
    under it (a cascade stage's catch-up), against the ancestor-or-self relation walked token by token."""
    rng = random.Random(3)
    works = [Work(BlockTable(), [0] * 4, 1), Work(BlockTable(), [0], 1, None, [-1])]
    for _ in range(5):
        n = rng.randint(1, 9)
        works.append(Work(BlockTable(), [0] * n, n, None, [-1] + [rng.randrange(i) for i in range(1, n)]))
    works.append(Work(BlockTable(), [0] * 6, 3, None, [-1, 0, 1, 2, 2, 3]))
    mask = _pack_tree_masks(works)
    width = max(len(w.tokens) for w in works)
    expected = []
    for w in works:
        parents = w.parents if w.parents is not None else list(range(-1, len(w.tokens) - 1))
        for token in range(len(w.tokens)):
            row, node = [False] * width, token
            while node >= 0:
                row[node], node = True, parents[node]
            expected.append(row)
    assert torch.equal(mask, torch.tensor(expected))
