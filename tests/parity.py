"""Compare specbeam's generate with transformers' on the same call: token for token, scores to float tolerance."""
import torch

from specbeam import Engine


def run_both(model, engine: Engine | None = None, **kwargs):
    """(transformers' output, specbeam's output) of the same generate call, as dict outputs with scores."""
    kwargs = dict(return_dict_in_generate=True, output_scores=True, output_logits=True, **kwargs)
    reference = model.generate(**kwargs)
    ours = (engine or Engine(model)).generate(**kwargs)
    return reference, ours


def running_rows(sequences: torch.Tensor, prompt_len: int, pad: int, eos) -> list[torch.Tensor]:
    """Per step, the rows still running before that step (finished rows' scores are not compared)."""
    eos = torch.tensor(eos if isinstance(eos, list) else [eos])
    generated = sequences[:, prompt_len:]
    done = torch.zeros(sequences.shape[0], dtype=torch.bool)
    rows = []
    for step in range(generated.shape[1]):
        rows.append(~done)
        done = done | torch.isin(generated[:, step], eos)
    return rows


def assert_same_tokens(reference, ours, prompt_len: int, pad: int, eos) -> None:
    assert torch.equal(reference.sequences, ours.sequences)
    assert len(reference.scores) == len(ours.scores)
    for step, rows in enumerate(running_rows(reference.sequences, prompt_len, pad, eos)):
        torch.testing.assert_close(ours.scores[step][rows], reference.scores[step][rows], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.logits[step][rows], reference.logits[step][rows], rtol=1e-5, atol=1e-5)


def assert_same_beams(model, reference, ours) -> None:
    assert torch.equal(reference.sequences, ours.sequences)
    assert torch.equal(reference.beam_indices, ours.beam_indices)
    torch.testing.assert_close(ours.sequences_scores, reference.sequences_scores, rtol=1e-5, atol=1e-5)
    assert len(reference.scores) == len(ours.scores)
    transitions = [
        model.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=False)
        for out in (reference, ours)
    ]
    torch.testing.assert_close(transitions[1], transitions[0], rtol=1e-5, atol=1e-5)
