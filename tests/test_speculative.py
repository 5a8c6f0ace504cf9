"""Speculative decoding is lossless: with any draft, greedy and beam search give exactly the target's own
output (scores, beam indices and all), and sampling draws from exactly the target's distribution. A draft
that agrees with the target makes the target run far fewer passes. Under beam search the draft searches all of
a prompt's beams at once."""
import copy
import dataclasses
import functools

import pytest
import torch
from scipy.stats import chisquare
from transformers import LogitsProcessorList

import specbeam
from specbeam import Engine
from specbeam.beam import NEG
from specbeam.config import EngineConfig, SpecConfig
from specbeam.drafters import DraftModelDrafter
from specbeam.lean_decoder import LeanDecoder
from parity import assert_same_beams, assert_same_tokens, run_both
from test_engine_sampling import WARPERS, _exact_probs, _tiny_vocab_model
from tiny_models import PAD, VOCAB, left_padded_batch, tiny_model

NEW_TOKENS = 12


@functools.cache
def drafts():
    target = tiny_model("llama")
    perturbed = copy.deepcopy(target)
    torch.manual_seed(9)
    with torch.no_grad():
        for param in perturbed.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    return {"perfect": copy.deepcopy(target), "perturbed": perturbed, "unrelated": tiny_model("llama", seed=7),
            "ngram": "ngram"}


def _inputs(eos=None):
    input_ids, attention_mask = left_padded_batch((7, 3, 5), seed=0)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, pad_token_id=PAD)
    return kwargs if eos is None else dict(kwargs, eos_token_id=eos)


# tokens the target emits early in some rows (found by greedy decoding), so that eos stops rows mid-run
EOS_ONE, EOS_LIST = 52, [52, 20]


@pytest.mark.parametrize("draft", ["perfect", "perturbed", "unrelated", "ngram"])
@pytest.mark.parametrize("eos", [EOS_ONE, EOS_LIST], ids=["eos-one", "eos-list"])
def test_speculative_greedy_equals_the_target_alone(draft, eos):
    model, inputs = tiny_model("llama"), _inputs(eos)
    reference, ours = run_both(model, Engine(model, draft_model=drafts()[draft]), do_sample=False, **inputs)
    assert_same_tokens(reference, ours, inputs["input_ids"].shape[1], PAD, eos)
    assert (reference.sequences[:, -1] == PAD).any()  # eos did stop a row mid-run


@pytest.mark.parametrize("draft", ["perfect", "perturbed", "unrelated", "ngram"])
@pytest.mark.parametrize(
    "beams, options",
    [(4, dict(num_return_sequences=2, length_penalty=0.0)), (8, dict(num_return_sequences=2, length_penalty=1.3)),
     (4, dict(early_stopping=True, repetition_penalty=1.2)), (4, dict(early_stopping="never", length_penalty=2.0))],
    ids=["4-lp0", "8-lp1.3", "4-early-penalty", "4-never-lp2"],
)
def test_speculative_beam_search_equals_the_target_alone(draft, beams, options):
    model = tiny_model("llama")
    engine = Engine(model, draft_model=drafts()[draft])
    reference, ours = run_both(model, engine, num_beams=beams, **_inputs(EOS_ONE), **options)
    assert_same_beams(model, reference, ours)
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks
    assert len(ours.trace.steps) == ours.stats.steps == len(reference.scores)


@pytest.mark.parametrize("mode", [dict(do_sample=False), dict(num_beams=4), dict(num_beams=8)],
                         ids=["greedy", "beam4", "beam8"])
def test_a_perfect_draft_halves_the_target_passes(mode):
    model = tiny_model("llama")
    out = Engine(model, draft_model=drafts()["perfect"], spec=SpecConfig(adaptive=False)).generate(
        **_inputs(), **mode, return_dict_in_generate=True)
    assert out.stats.target_passes <= out.stats.steps / 2
    assert out.stats.draft_passes > 0 and out.stats.accepted_by_depth[0] > 0


def test_a_perfect_chain_draft_is_accepted_to_its_full_depth():
    """A perfect draft as a chain of fixed depth 3 (its greedy path) is accepted whole in every round, so the
    target runs once per 4 tokens after the prefill."""
    model = tiny_model("llama")
    spec = SpecConfig(depth=3, width=1, branch=1, adaptive=False)
    out = Engine(model, draft_model=drafts()["perfect"], spec=spec).generate(
        **_inputs(), eos_token_id=None, do_sample=False, return_dict_in_generate=True)
    stats = out.stats
    assert stats.rounds > 0 and stats.accepted_by_depth == [stats.rounds] * 3
    assert stats.target_passes <= 1 + -(-NEW_TOKENS // 4)


def test_a_perfect_draft_takes_beam_search_to_its_full_depth():
    """Under beam search a perfect draft at a fixed depth 3 covers every beam the target keeps, to depth 3 in
    some round."""
    model = tiny_model("llama")
    out = Engine(model, draft_model=drafts()["perfect"], spec=SpecConfig(depth=3, adaptive=False)).generate(
        **_inputs(), eos_token_id=None, num_beams=4, return_dict_in_generate=True)
    assert len(out.stats.accepted_by_depth) == 3 and out.stats.accepted_by_depth[2] > 0


def test_a_perfect_draft_keeps_a_long_batched_beam_search_in_its_trees():
    """A perfect draft at a fixed depth 4 under beam search over 8 prompts for 64 steps, while blocks of both pools
    are freed and reused: the draft's K/V stay right (a block freed while a table still reads it would be
    rewritten, and the draft's beams would leave the trees early), and every block is free once, at the end."""
    model = tiny_model("llama")
    engine = Engine(model, draft_model=drafts()["perfect"], spec=SpecConfig(depth=4, adaptive=False))
    input_ids = torch.randint(2, VOCAB, (8, 6), generator=torch.Generator().manual_seed(3))
    out = engine.generate(input_ids, max_new_tokens=64, min_new_tokens=64, num_beams=4, eos_token_id=None,
                          return_dict_in_generate=True)
    assert out.stats.steps == 64 and out.stats.target_passes - 1 <= 64 / 3
    for cache in (engine.cache, engine.drafter.cache):
        assert sorted(cache.allocator.free) == list(range(cache.allocator.num_blocks))


def test_draft_with_another_vocabulary_is_refused():
    other = tiny_model("qwen2")  # same vocabulary size: fine
    Engine(tiny_model("llama"), draft_model=other)
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(tiny_model("llama"), draft_model=small)


def test_patched_generate_takes_assistant_model_with_beams():
    """transformers refuses assisted beam search; through specbeam it is exact. (At a fixed depth: the adaptive
    policy may rightly leave a tiny model's draft unused for a call this short.)"""
    model = tiny_model("llama")
    inputs, draft = _inputs(EOS_ONE), drafts()["perturbed"]
    reference = model.generate(**inputs, num_beams=4)
    specbeam.patch(model, spec=SpecConfig(depth=2, adaptive=False))
    try:
        out = model.generate(**inputs, num_beams=4, assistant_model=draft, return_dict_in_generate=True)
    finally:
        specbeam.unpatch(model)
    assert torch.equal(out.sequences, reference) and out.stats.draft_passes > 0


def test_speculative_sampling_with_a_disagreeing_draft_fits_the_exact_distribution():
    """Joint law of two sampled tokens against the target's exact processed probabilities."""
    target, samples = _tiny_vocab_model(), 6000
    draft = _tiny_vocab_model()
    torch.manual_seed(1)
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(torch.randn_like(param) * 0.5)  # a draft that disagrees often
    prompt = torch.tensor([[3, 1, 4]])
    out = Engine(target, draft_model=draft, spec=SpecConfig(adaptive=False)).generate(
        prompt, do_sample=True, max_new_tokens=2, num_return_sequences=samples,
        generator=torch.Generator().manual_seed(0), return_dict_in_generate=True, **WARPERS)
    accepted = out.stats.accepted_by_depth[0]  # rows whose first drafted token was accepted
    assert 0.1 * samples < accepted < 0.9 * samples
    pairs = out.sequences[:, 3] * 8 + out.sequences[:, 4]
    observed = torch.bincount(pairs, minlength=64).double()
    first = _exact_probs(target, prompt)[0]
    continuations = torch.cat([prompt.expand(8, -1), torch.arange(8)[:, None]], dim=1)
    joint = (first[:, None] * _exact_probs(target, continuations)).flatten()
    assert observed[joint == 0].sum() == 0
    support = joint > 0
    expected = joint[support] * samples
    assert chisquare(observed[support], expected * observed[support].sum() / expected.sum()).pvalue > 1e-3


def test_tree_shape_follows_spec_config():
    """Trees hold at most node_budget drafted nodes, `depth` deep; a perfect draft fills them every round (2 nodes
    at depth 1, the budget's other 3 at depth 2), its first token is accepted every round, and depth 2 too."""
    model = tiny_model("llama")
    spec = SpecConfig(depth=3, width=3, branch=2, node_budget=5, adaptive=False)
    out = Engine(model, draft_model=drafts()["perfect"], spec=spec).generate(
        **_inputs(), do_sample=False, return_dict_in_generate=True)
    stats = out.stats
    assert 0 < stats.rounds and 2 * stats.rounds <= stats.drafted_tokens <= 5 * stats.rounds
    assert 2 <= len(stats.accepted_by_depth) <= 3
    assert stats.accepted_by_depth[0] == stats.rounds and stats.accepted_by_depth[1] > 0
    with pytest.raises(ValueError, match="depth"):
        SpecConfig(depth=0)


def test_speculative_streamer_sees_the_same_tokens():
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.flatten())

        def end(self):
            pass

    model, prompt, stream = tiny_model("llama"), torch.tensor([[5, 9, 11, 3]]), Collect()
    engine = Engine(model, draft_model=drafts()["perturbed"])
    out = engine.generate(prompt, max_new_tokens=8, streamer=stream)
    assert torch.equal(out, model.generate(prompt, max_new_tokens=8))
    assert torch.equal(torch.cat(stream.chunks), out.flatten())
    with pytest.raises(ValueError, match="streamer"):
        engine.generate(**_inputs(), streamer=Collect())


def _alone(propose):
    """Run a session's propose generator by itself, each draft pass its own forward: the trees."""
    logits = None
    while True:
        try:
            draft_pass = propose.send(logits)
        except StopIteration as done:
            return done.value
        logits = draft_pass.drafter.runner.forward(draft_pass.drafter.cache, draft_pass.works)


def test_beam_drafts_keep_the_best_nodes_per_prompt_over_all_its_beams():
    """Under beam search the draft searches all of a prompt's beams at once: each depth keeps the `width` best
    nodes by beam score + cumulative draft log-probability, and a beam that is not live grows nothing."""
    draft = tiny_model("llama")
    spec = SpecConfig(depth=2, width=3, branch=3, adaptive=False)
    beams = [[5, 9, 14], [5, 9, 30], [5, 9, 41]]  # three beams of one prompt, the root last
    scores = [-0.1, -2.0, NEG]  # the third is not live (transformers' impossible score)
    session = DraftModelDrafter(draft, VOCAB, EngineConfig(), num_blocks=64).session(len(beams))
    trees = _alone(session.propose([0, 1, 2], beams, [0, 0, 0], LogitsProcessorList(), spec, [2, 2, 2],
                                   log_softmax=True, beams=[(0, s) for s in scores]))
    session.end()
    assert len(trees[2]) == 1
    with torch.no_grad():
        log_q = [torch.log_softmax(draft(torch.tensor([b])).logits[0, -1].float(), -1) for b in beams[:2]]
    ranked = sorted(((scores[b] + float(log_q[b][t]), b, t) for b in range(2) for t in range(VOCAB)), reverse=True)
    first = {(b, t.tokens[n]) for b, t in enumerate(trees[:2]) for n in range(1, len(t)) if t.parents[n] == 0}
    assert first == {(b, t) for _, b, t in ranked[:3]}
    assert sum(len(t) - 1 for t in trees) == 6  # three nodes per depth over the prompt's trees


def _by_hand(weight: torch.Tensor, weights: str) -> torch.Tensor:  # [N, K]: rounded, or int8 per row
    if weights == "bfloat16":
        return weight.bfloat16().to(weight.dtype)
    scale = weight.abs().amax(1, keepdim=True).float() / 127
    return (torch.round(weight.float() / scale) * scale).to(weight.dtype)


def _read_by_hand(model, weights: str):
    """A copy of a Llama whose every linear weight is rounded to bfloat16 or quantized to int8 by hand."""
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for layer in copied.model.layers:
            for linear in (*(getattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
                           layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                linear.weight.copy_(_by_hand(linear.weight, weights))
        copied.lm_head.weight.copy_(_by_hand(copied.lm_head.weight, weights))
    return copied


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
@pytest.mark.parametrize("mode", [dict(do_sample=False), dict(num_beams=4)], ids=["greedy", "beam4"])
def test_a_draft_read_in_fewer_bits_changes_no_output(weights, mode):
    """draft_weights: the draft runs on exactly the weights of a copy rounded or quantized by hand (not on its
    own), and the target's output is still its own."""
    model, draft, inputs = tiny_model("llama"), drafts()["perturbed"], _inputs(EOS_ONE)
    engine = Engine(model, draft_model=draft, spec=SpecConfig(depth=3, adaptive=False, draft_weights=weights))
    reference, ours = run_both(model, engine, **mode, **inputs)
    (assert_same_tokens(reference, ours, inputs["input_ids"].shape[1], PAD, EOS_ONE) if "num_beams" not in mode
     else assert_same_beams(model, reference, ours))
    read, by_hand = engine.drafter.runner.lean, LeanDecoder(_read_by_hand(draft, weights))
    assert torch.allclose(read.head_weight, by_hand.head_weight, rtol=1e-6, atol=0)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=0)
               for a, b in zip(read.layers[-1][1], by_hand.layers[-1][1]) if torch.is_tensor(a))
    assert not torch.allclose(read.head_weight, LeanDecoder(draft).head_weight, rtol=1e-6, atol=0)  # it changed


@pytest.mark.parametrize("weights, packed_as", [("bfloat16", torch.bfloat16), ("int8", torch.int8)])
def test_a_float32_draft_read_in_fewer_bits_streams_fewer_bytes(weights, packed_as):
    """With the C++ linear a float32 draft's weights are packed as bfloat16 (widened back exactly) or int8 (with
    column scales); the reference backend holds the rounded or dequantized float32 copy. The draft is unchanged."""
    draft = copy.deepcopy(tiny_model("llama")).float()
    before = draft.lm_head.weight.clone()
    engine = Engine(copy.deepcopy(draft), draft_model=draft, spec=SpecConfig(draft_weights=weights))
    head = engine.drafter.runner.lean.head_weight
    backend = specbeam.ops.layer_backend(draft.device, draft.dtype)[0]
    assert head.dtype == (packed_as if backend == "cpp" else torch.float32)
    assert torch.equal(draft.lm_head.weight, before)


def test_draft_weights_is_checked():
    with pytest.raises(ValueError, match="draft_weights"):
        SpecConfig(draft_weights="int4")
    with pytest.raises(ValueError, match="draft_weights"):  # GPT-2 does not run on the lean decoder
        Engine(tiny_model("llama"), draft_model=tiny_model("gpt2"), spec=SpecConfig(draft_weights="bfloat16"))
