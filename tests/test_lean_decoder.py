"""The lean decoder stands in for the forward of Llama, Mistral and Qwen2: the same logits as the model's own
forward through specbeam's attention (float64), so every parity test of the engine runs through it. Other
models, and `lean_decoder=False`, run their own forward."""
import pytest
import torch

from specbeam import Engine
from specbeam.cache import BlockTable
from specbeam.lean_decoder import unsupported_reason
from tiny_models import tiny_model


@torch.no_grad()
def _packed_forward_logits(engine: Engine, tokens: list[torch.Tensor]) -> torch.Tensor:
    """Prefill each sequence, then score a 3-node tree on each: every row of every token."""
    runner, cache = engine.runner, engine.runner.new_cache(num_blocks=32, block_size=4)
    tables = [BlockTable() for _ in tokens]
    runner.forward(cache, tables, tokens)
    tree = torch.tensor([[True, False, False], [True, True, False], [True, False, True]])
    new = [torch.tensor([5, 9, 11]), torch.tensor([7, 8, 3])]
    rows = torch.arange(6)
    return runner.forward(cache, tables, new, depths=[torch.tensor([0, 1, 1])] * 2, tree_masks=[tree] * 2,
                          logit_rows=rows)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_lean_logits_equal_the_models_own_forward(arch):
    model = tiny_model(arch)
    lean, own = Engine(model), Engine(model, lean_decoder=False)
    assert lean.runner.lean is not None and own.runner.lean is None
    prompts = [torch.tensor([3, 14, 15, 92, 65]), torch.tensor([35, 89])]
    torch.testing.assert_close(_packed_forward_logits(lean, prompts), _packed_forward_logits(own, prompts),
                               rtol=1e-12, atol=1e-12)


def test_other_models_run_their_own_forward():
    model = tiny_model("gpt2")
    assert "GPT2LMHeadModel" in unsupported_reason(model)
    assert Engine(model).runner.lean is None


def test_lean_decoder_option_is_checked():
    with pytest.raises(TypeError, match="lean_decoder"):
        Engine(tiny_model("llama"), lean_decoder="yes")
