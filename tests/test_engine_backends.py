"""The engine over each attention backend: the Triton kernel (here through its CPU interpreter, as it would
run on a GPU), the C++ extension and the torch reference all give transformers' own output."""
import copy

import pytest
import torch

from specbeam import Engine, ops
from tiny_models import PAD, left_padded_batch, tiny_model


@pytest.mark.parametrize("backend", ["triton", "cpp", "reference"])
def test_speculative_beam_search_over_each_attention_backend(backend):
    if backend == "cpp" and not ops.backend_info()["paged_attention"].startswith("cpp"):
        pytest.skip("specbeam._C is not built")
    model = copy.deepcopy(tiny_model("llama")).float()  # the Triton kernel runs float16/bfloat16/float32
    input_ids, attention_mask = left_padded_batch()
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=6, num_beams=3, pad_token_id=PAD)
    reference = model.generate(input_ids, **kwargs)
    engine = Engine(model, draft_model=copy.deepcopy(model), attention_backend=backend)
    assert torch.equal(engine.generate(input_ids, **kwargs), reference)
    assert torch.equal(engine.generate(input_ids, do_sample=False, **{**kwargs, "num_beams": 1}),
                       model.generate(input_ids, do_sample=False, **{**kwargs, "num_beams": 1}))


def test_unknown_attention_backend_is_refused():
    with pytest.raises(ValueError, match="attention_backend"):
        Engine(tiny_model("llama"), attention_backend="cuda")
