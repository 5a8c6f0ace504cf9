"""The engine on a CUDA GPU, where every op runs its compiled Triton kernel: greedy, beam search and their
speculative forms give transformers' own output on the same GPU (float32, tf32 off); speculative sampling
keeps the target's distribution. Needs a GPU and `TRITON_INTERPRET=0`; CI has neither and skips this file."""
import copy
import os

import pytest
import torch

from specbeam import Engine, ops
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


def test_speculative_sampling_on_cuda_keeps_the_first_token_distribution(models, fit_pvalue):
    """4000 one-token samples through the speculative path against the target's exact softmax."""
    target, perturbed = models
    input_ids = torch.tensor([[5, 17, 33, 8]], device="cuda")
    with torch.inference_mode():
        probs = target(input_ids).logits[0, -1].double().softmax(-1)
        engine = Engine(target, draft_model=perturbed)
        batch = input_ids.expand(500, -1)
        draws = torch.cat([engine.generate(batch, do_sample=True, top_k=0, max_new_tokens=1,
                                           pad_token_id=PAD)[:, -1] for _ in range(8)])
    counts = torch.bincount(draws.cpu(), minlength=probs.numel())
    assert fit_pvalue(counts, probs) > 1e-3
