"""Acceptance statistics and their picture."""
import copy

from specbeam import Engine
from specbeam.config import SpecConfig
from specbeam.stats import plot_acceptance
from tiny_models import left_padded_batch, tiny_model


def test_acceptance_rates_of_a_perfect_draft_and_their_picture(tmp_path):
    model = tiny_model("llama")
    input_ids, attention_mask = left_padded_batch()
    out = Engine(model, draft_model=copy.deepcopy(model), spec=SpecConfig(adaptive=False)).generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=10, return_dict_in_generate=True)
    rates = out.stats.acceptance_by_depth()
    assert rates[0] == 1.0 and all(a >= b for a, b in zip(rates, rates[1:]))  # depth-1 always agrees
    assert out.stats.rounds >= 3 and out.stats.mean_accepted() > 1.0
    path = plot_acceptance({"perfect draft": out.stats}, str(tmp_path / "acceptance.png"))
    assert open(path, "rb").read(4) == b"\x89PNG"
