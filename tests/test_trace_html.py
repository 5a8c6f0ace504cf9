"""`specbeam.trace.to_html`: the page's embedded data holds every node of the trace with its parent and fate,
the returned sequences' paths are transformers' `beam_indices`, a speculative run's drafted trees are there
with the nodes the target kept, token texts cannot break the page, and the page asks for nothing outside it."""
import copy
import json
import re

import pytest
import torch

from specbeam import Engine, SpecConfig
from specbeam.trace import to_html
from tiny_models import VOCAB, left_padded_batch, tiny_model

# texts that would break a page that did not escape them, among plain ones
NASTY = {3: "</script><script>alert(1)</script>", 4: "<!--", 5: "a & b", 6: "\n", 7: "  ", 8: "\u2028", 9: '"'}


class FakeTokenizer:
    """Decodes token i as NASTY[i] or 't<i>'."""

    def decode(self, ids):
        return "".join(NASTY.get(int(i), f"t{int(i)}") for i in ids)


def page_data(path) -> dict:
    html = path.read_text(encoding="utf-8")
    blocks = re.findall(r'<script type="application/json" id="trace-data">(.*?)</script>', html, re.S)
    assert len(blocks) == 1
    return json.loads(blocks[0])


def beam_output(engine_kwargs=None, **kwargs):
    input_ids, attention_mask = left_padded_batch((6, 4), seed=2)
    engine = Engine(tiny_model("llama"), **(engine_kwargs or {}))
    out = engine.generate(input_ids, attention_mask=attention_mask, max_new_tokens=7, return_dict_in_generate=True,
                          **{"num_beams": 3, **kwargs})
    return out, input_ids.shape[1]


CASES = {
    "same length": dict(num_return_sequences=2),
    "eos, different lengths": dict(num_return_sequences=3, eos_token_id=[7, 11, 23, 42], length_penalty=0.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_node_is_in_the_page_with_its_parent_and_fate(tmp_path, case):
    out, _ = beam_output(**CASES[case])
    trace, path = out.trace, tmp_path / "trace.html"
    assert to_html(trace, FakeTokenizer(), str(path)) == str(path)
    data = page_data(path)
    K = trace.steps[0].token.shape[1]
    assert data["num_steps"] == len(trace.steps) and data["num_candidates"] == K and len(data["prompts"]) == 2
    for prompt, page in enumerate(data["prompts"]):
        nodes = page["nodes"]
        assert len(nodes) == len(trace.steps) * K
        for t, step in enumerate(trace.steps):
            fates = trace.fates(t, prompt)
            for k in range(K):
                node, slot = nodes[t * K + k], int(step.parent[prompt, k])
                assert (node["step"], node["rank"], node["token"], node["slot"]) == (t, k, int(step.token[prompt, k]), slot)
                assert node["text"] == FakeTokenizer().decode([node["token"]])
                parent = t - 1, int(trace.steps[t - 1].survivors[prompt, slot]) if t else None
                assert node["parent"] == (parent[0] * K + parent[1] if t else -1)
                # the page's fate is the trace's, but a candidate that finished shows as finished, and
                # nothing runs on after the last step
                expected = "finished" if bool(step.finished[prompt, k]) else fates[k]
                if t == len(trace.steps) - 1 and expected == "running":
                    expected = "dropped"
                assert node["fate"] == expected
                assert node["score"] == pytest.approx(float(step.score[prompt, k]))


@pytest.mark.parametrize("case", list(CASES))
def test_returned_paths_follow_the_backpointers_to_beam_indices(tmp_path, case):
    kwargs = CASES[case]
    out, prompt_len = beam_output(**kwargs)
    to_html(out.trace, None, str(tmp_path / "trace.html"))
    data, n, beams = page_data(tmp_path / "trace.html"), kwargs["num_return_sequences"], 3
    lengths = set()
    for row in range(out.sequences.shape[0]):
        prompt, index = divmod(row, n)
        page = data["prompts"][prompt]
        assert len(page["returned"]) == n
        nodes, end = page["nodes"], page["returned"][index]["node"]
        # walk the page's own backpointers from the returned end node to the prompt
        walk = []
        while end >= 0:
            walk.append(end)
            end = nodes[end]["parent"]
        walk.reverse()
        assert walk == page["returned"][index]["path"]
        length = int((out.beam_indices[row] >= 0).sum())
        lengths.add(length)
        assert [nodes[i]["slot"] + prompt * beams for i in walk] == out.beam_indices[row, :length].tolist()
        assert [nodes[i]["token"] for i in walk] == out.sequences[row, prompt_len : prompt_len + length].tolist()
        assert nodes[walk[-1]]["fate"] == "finished"
    if "eos_token_id" in kwargs:
        assert len(lengths) > 1  # the case does test hypotheses that end at different steps


def test_token_text_cannot_break_the_page(tmp_path):
    out, _ = beam_output(num_return_sequences=2)
    for step in out.trace.steps:  # every candidate's token one of the nasty ones
        step.token.copy_(torch.tensor(list(NASTY))[step.token % len(NASTY)])
    html = (tmp_path / "trace.html")
    to_html(out.trace, FakeTokenizer(), str(html))
    text = html.read_text(encoding="utf-8")
    block = text.split('id="trace-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in block and ">" not in block and "&" not in block and "\u2028" not in block
    texts = {node["text"] for page in page_data(html)["prompts"] for node in page["nodes"]}
    assert texts == set(NASTY.values())
    assert text.count("</script>") == 2  # the data block's and the code's, nothing from a token


def test_the_page_asks_for_nothing_outside_itself(tmp_path):
    out, _ = beam_output()
    to_html(out.trace, FakeTokenizer(), str(tmp_path / "trace.html"))
    html = (tmp_path / "trace.html").read_text(encoding="utf-8")
    for needle in ("src=", "href=", "url(", "@import", "fetch(", "XMLHttpRequest", "WebSocket", "EventSource",
                   "<link", "<img", "<iframe", "import("):
        assert needle not in html, needle
    # the only address is SVG's namespace name, which is an identifier, never loaded
    assert set(re.findall(r"https?://[^\s\"')]+", html)) == {"http://www.w3.org/2000/svg"}


def test_speculative_beam_search_records_each_rounds_draft_and_what_the_target_kept(tmp_path):
    model = tiny_model("llama")
    spec = dict(draft_model=copy.deepcopy(model), spec=SpecConfig(depth=2, adaptive=False))
    out, _ = beam_output(spec, num_beams=4)
    plain, _ = beam_output(num_beams=4)
    assert torch.equal(out.sequences, plain.sequences)
    assert plain.trace.drafts == []
    drafts, beams = out.trace.drafts, 4
    assert drafts and {d.prompt for d in drafts} == {0, 1}
    for prompt in (0, 1):
        steps = [d.step for d in drafts if d.prompt == prompt]
        assert steps == sorted(set(steps)) and steps[0] == 0
    for d in drafts:
        assert len(d.tokens) == len(d.parents) == len(d.beams) == len(d.kept)
        roots = [i for i, p in enumerate(d.parents) if p < 0]
        assert sorted(d.beams[i] for i in roots) == list(range(beams)) and all(d.kept[i] for i in roots)
        for i, p in enumerate(d.parents):
            assert p < i and all(0 <= t < VOCAB for t in d.tokens)
            if p >= 0:
                assert d.beams[i] == d.beams[p]  # a node belongs to its root's beam
                assert not d.kept[i] or d.kept[p]  # the replay walks from the root down
    assert any(not k for d in drafts for k in d.kept)  # the draft proposes more than the target keeps

    # the page: every kept drafted node is the running candidate of its step with its token
    to_html(out.trace, None, str(tmp_path / "trace.html"))
    data = page_data(tmp_path / "trace.html")
    for prompt, page in enumerate(data["prompts"]):
        rounds = [d for d in drafts if d.prompt == prompt]
        assert [r["kept"] for r in page["drafts"]] == [d.kept for d in rounds]
        for r in page["drafts"]:
            for i, (kept, parent, match) in enumerate(zip(r["kept"], r["parents"], r["match"])):
                if parent < 0 or not kept:
                    assert match == -1
                    continue
                node = page["nodes"][match]
                assert node["token"] == r["tokens"][i] and node["step"] == r["step"] + r["depths"][i] - 1
                assert node["beam"] >= 0  # it ran on
