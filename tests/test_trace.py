"""The beam trace is the full backpointer tree: following it reproduces the returned hypotheses, and
`specbeam.trace.render` draws it as text or PNGs that stay legible however long the search."""
import torch
from PIL import Image

from specbeam import Engine, trace_png
from specbeam.trace import Trace, TraceStep, render
from tiny_models import left_padded_batch, tiny_model


def _beam_output(**kwargs):
    input_ids, attention_mask = left_padded_batch((6, 4), seed=2)
    out = Engine(tiny_model("llama")).generate(
        input_ids, attention_mask=attention_mask, num_beams=3, max_new_tokens=7, return_dict_in_generate=True,
        output_scores=True, **kwargs,
    )
    return out, input_ids.shape[1]


def _walk_back(trace, prompt: int, step: int, candidate: int) -> list[tuple[int, int]]:
    """(parent beam slot, token) of every step of the hypothesis ending at (step, candidate), found through
    the trace's backpointers alone."""
    path = []
    while step >= 0:
        s = trace.steps[step]
        slot = int(s.parent[prompt, candidate])
        path.append((slot, int(s.token[prompt, candidate])))
        if step > 0:
            candidate = int(trace.steps[step - 1].survivors[prompt, slot])
        step -= 1
    return path[::-1]


def test_trace_backpointers_rebuild_the_best_running_beam_and_its_score():
    out, _ = _beam_output()
    trace, last, beams = out.trace, len(out.trace.steps) - 1, 3
    for prompt in range(2):
        best = int(trace.steps[last].survivors[prompt, 0])
        assert trace.fates(last, prompt)[best] == "running"
        path = _walk_back(trace, prompt, last, best)
        # the accumulated score is the sum of the processed log-probabilities along the path
        total = sum(out.scores[t][prompt * beams + slot, token] for t, (slot, token) in enumerate(path))
        torch.testing.assert_close(trace.steps[last].score[prompt, best], total, rtol=1e-5, atol=1e-4)


def test_returned_hypotheses_appear_in_the_trace():
    out, prompt_len = _beam_output(length_penalty=0.0)
    trace = out.trace
    for row in range(out.sequences.shape[0]):
        generated = out.sequences[row, prompt_len:].tolist()
        length = int((out.beam_indices[row] >= 0).sum())
        step = length - 1
        finished = trace.steps[step].finished[row]
        paths = [[t for _, t in _walk_back(trace, row, step, k)] for k in range(finished.shape[0]) if finished[k]]
        assert generated[:length] in paths
        # with length_penalty 0 the hypothesis score is the accumulated log-probability itself
        index = paths.index(generated[:length])
        candidate = [k for k in range(finished.shape[0]) if finished[k]][index]
        torch.testing.assert_close(out.sequences_scores[row], trace.steps[step].score[row, candidate])


def test_only_stopped_candidates_are_marked_finished():
    """A candidate enters the finished hypotheses only by emitting eos or reaching the length limit."""
    out, prompt_len = _beam_output(eos_token_id=[7, 11, 23, 42], early_stopping="never")
    last = len(out.trace.steps) - 1
    for t, step in enumerate(out.trace.steps):
        ends = torch.isin(step.token, torch.tensor([7, 11, 23, 42]))
        assert (ends | (t == last))[step.finished].all()


def test_render_text_and_png(tmp_path):
    out, _ = _beam_output()
    text = render(out.trace)
    assert text.startswith("step 0") and "running" in text
    path = render(out.trace, path=str(tmp_path / "tree.png"), prompt=1)
    assert (tmp_path / "tree.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.endswith("tree.png")


def _chain_trace(num_steps: int, beams: int = 2, candidates: int = 4) -> Trace:
    """A made-up trace: each step's candidates alternate between the two running beams."""
    parent = (torch.arange(candidates) % beams)[None]
    score = -torch.arange(candidates, dtype=torch.float32)[None]
    steps = [TraceStep(parent, torch.arange(candidates)[None] + t, score - t, torch.arange(beams)[None],
                       torch.zeros((1, candidates), dtype=torch.bool)) for t in range(num_steps)]
    return Trace(steps)


def test_a_long_search_is_cut_into_panels_and_files_of_one_scale(tmp_path, monkeypatch):
    """30 steps: two panels of at most 24 steps; with one panel a file, two files. Every image is the page's
    width, so a step gets as many pixels in a long search as in a short one."""
    width = round(trace_png.PAGE_WIDTH * trace_png.DPI)
    assert width / trace_png.STEPS_PER_PANEL >= 70  # pixels per step: room for a 10-character label at 7 pt
    trace = _chain_trace(30)
    assert trace_png.panel_ranges(30) == [[range(0, 24), range(24, 30)]]
    assert render(trace, path=str(tmp_path / "one.png")) == str(tmp_path / "one.png")
    assert not (tmp_path / "one-2.png").exists()
    one = Image.open(tmp_path / "one.png").size
    monkeypatch.setattr(trace_png, "PANELS_PER_FILE", 1)
    paths = trace_png.render_png(trace, str(tmp_path / "tree.png"))
    assert paths == [str(tmp_path / "tree.png"), str(tmp_path / "tree-2.png")]
    sizes = [Image.open(p).size for p in paths]
    assert one[0] == sizes[0][0] == sizes[1][0] == width
    assert one[1] > sizes[0][1]  # two panels stacked in one image
