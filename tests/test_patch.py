"""`specbeam.patch(model)` makes `model.generate` go through specbeam; unsupported options fall back to
transformers' own generate with one warning per option; `unpatch` restores the original."""
import warnings

import pytest
import torch

import specbeam
from tiny_models import left_padded_batch, tiny_model


@pytest.fixture
def model():
    model = tiny_model("llama")
    yield model
    specbeam.unpatch(model)


def test_patched_generate_runs_specbeam_with_equal_outputs(model):
    input_ids, attention_mask = left_padded_batch()
    reference = model.generate(input_ids, attention_mask=attention_mask, num_beams=3, max_new_tokens=6)
    specbeam.patch(model)
    out = model.generate(input_ids, attention_mask=attention_mask, num_beams=3, max_new_tokens=6,
                         return_dict_in_generate=True)
    assert torch.equal(out.sequences, reference)
    assert out.trace is not None and model._specbeam_engine.last_stats is out.stats


def test_unsupported_option_falls_back_with_one_warning(model):
    specbeam.patch(model)
    prompt = torch.tensor([[4, 5, 6]])
    with pytest.warns(UserWarning, match="output_hidden_states"):
        out = model.generate(prompt, max_new_tokens=2, output_hidden_states=True, return_dict_in_generate=True)
    assert out.hidden_states is not None and not hasattr(out, "stats")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(prompt, max_new_tokens=2, output_hidden_states=True, return_dict_in_generate=True)


def test_unpatch_restores_transformers_generate(model):
    specbeam.patch(model)
    specbeam.unpatch(model)
    assert not hasattr(model, "_specbeam_engine")
    out = model.generate(torch.tensor([[4, 5, 6]]), max_new_tokens=2, return_dict_in_generate=True)
    assert not hasattr(out, "stats")
