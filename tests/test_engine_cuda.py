"""The engine on a CUDA GPU, where every op runs its compiled Triton kernel: greedy, beam search and their
speculative forms give transformers' own output on the same GPU (float32, tf32 off); speculative sampling
at a fixed depth 2 keeps the target's joint law of 3 tokens. Needs a GPU and `TRITON_INTERPRET=0`; CI has
neither and skips this file."""
import copy
import os

import pytest
import torch

from specbeam import Engine, ops
from specbeam.config import SpecConfig
from exact_law import VOCAB8, cells, exact_joint, lookup_prompt, marginal, pooled, sampling_processors, vocab8_model
from tiny_models import PAD, left_padded_batch, tiny_model

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU with Triton compiling for real (TRITON_INTERPRET=0)",
)

MODES = {"greedy": dict(do_sample=False), "beam4": dict(num_beams=4, num_return_sequences=2),
         "beam8": dict(num_beams=8, length_penalty=0.0)}


@pytest.fixture(scope="module")
def models():
    torch.backends.cuda.matmul.allow_tf32 = False
    target = copy.deepcopy(tiny_model("llama")).float().cuda()
    perturbed = copy.deepcopy(target)
    torch.manual_seed(9)
    with torch.no_grad():
        for param in perturbed.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    return target, perturbed


def _inputs():
    input_ids, attention_mask = left_padded_batch((7, 3, 5), seed=0)
    return dict(input_ids=input_ids.cuda(), attention_mask=attention_mask.cuda(), max_new_tokens=12,
                pad_token_id=PAD, eos_token_id=52)


def test_every_op_runs_triton_on_cuda():
    assert ops._pick(None, torch.device("cuda")) == "triton"


@pytest.mark.parametrize("draft", [None, "perturbed", "ngram"])
@pytest.mark.parametrize("mode", MODES)
def test_engine_on_cuda_equals_transformers(models, mode, draft):
    target, perturbed = models
    draft_model = {"perturbed": perturbed, "ngram": "ngram", None: None}[draft]
    engine = Engine(target, draft_model=draft_model)
    with torch.inference_mode():
        reference = target.generate(**_inputs(), **MODES[mode])
        ours = engine.generate(**_inputs(), **MODES[mode])
    assert ours.device.type == "cuda"
    assert torch.equal(ours, reference)
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks


SAMPLING = dict(temperature=0.7, top_k=6)


def speculative_sampling_counts(device: str, draft: str):
    """3 tokens sampled 4000 times through trees of fixed depth 2 on the vocab-8 model (float32 on `device`), from
    a draft that agrees often (two chains) or n-gram lookup: (cell counts, the exact law, acceptance by depth)."""
    target = vocab8_model().float().to(device)
    draft_model = vocab8_model(noise=0.01).float().to(device) if draft == "model" else "ngram"
    processors = sampling_processors(**SAMPLING)
    prompt = lookup_prompt(target, processors) if draft == "ngram" else torch.tensor([[3, 1, 3, 1, 3]], device=device)
    engine = Engine(target, draft_model=draft_model, spec=SpecConfig(depth=2, width=2, adaptive=False))
    with torch.inference_mode():
        law = exact_joint(target, prompt.to(device), processors, 3)
        out = engine.generate(prompt.to(device), do_sample=True, max_new_tokens=3, num_return_sequences=4000,
                              generator=torch.Generator(device).manual_seed(0), return_dict_in_generate=True,
                              **SAMPLING)
    return cells(out.sequences, prompt.shape[1], VOCAB8), law, out.stats.accepted_by_depth


@pytest.mark.parametrize("draft", ["model", "ngram"])
def test_speculative_sampling_on_cuda_fits_the_exact_joint_law(draft, fit_pvalue):
    """Through the Triton kernels, drafted tokens verified at depth 2: the law of 3 sampled tokens, and of the
    first 2, fits the exact law from transformers' processors on every prefix (`exact_law`)."""
    counts, law, accepted = speculative_sampling_counts("cuda", draft)
    assert len(accepted) >= 2 and accepted[1] > 0
    for tokens in (3, 2):
        assert fit_pvalue(*pooled(marginal(counts, VOCAB8, tokens), marginal(law, VOCAB8, tokens))) > 1e-3
