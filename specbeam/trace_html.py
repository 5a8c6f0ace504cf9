"""The beam trace as one self-contained HTML page: the node data as JSON in a
`<script type="application/json" id="trace-data">` block, drawn as SVG by `trace_view.js` (pan, zoom, hover,
step range, returned paths, drafted trees). No network, no external assets: the CSS and JS are inlined."""
import json
import math
from importlib import resources

from specbeam.trace import DraftRound, Trace, token_text

MAX_LABEL = 14  # characters of a node's label; the full text is in its tooltip
VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}  # whitespace a label must show to be readable


def label(text: str) -> str:
    """A token's text with its whitespace made visible, cut to MAX_LABEL characters."""
    shown = "".join(VISIBLE.get(c, c) for c in text)
    return shown if len(shown) <= MAX_LABEL else shown[: MAX_LABEL - 1] + "…"


def _score(value: float) -> float | None:
    """JSON has no infinities: a candidate the processors ruled out (-inf) has no score."""
    return value if math.isfinite(value) else None


class _Texts:
    """Each token's text, decoded once."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            self.cache[token] = token_text(token, self.tokenizer)
        return self.cache[token]


def _nodes(trace: Trace, prompt: int, texts: _Texts) -> list[dict]:
    """Every candidate of every step; node id = step * K + rank, `parent` is a node id (-1: the prompt)."""
    nodes, num_candidates = [], trace.steps[0].token.shape[1]
    for t, s in enumerate(trace.steps):
        slots, tokens, scores = (values[prompt].tolist() for values in (s.parent, s.token, s.score))
        survivors = s.survivors[prompt].tolist()
        previous = trace.steps[t - 1].survivors[prompt].tolist() if t else []
        for k, fate in enumerate(trace.outcomes(t, prompt)):
            nodes.append(dict(
                id=t * num_candidates + k, step=t, rank=k, token=tokens[k], text=texts(tokens[k]),
                label=label(texts(tokens[k])), score=_score(scores[k]), fate=fate,
                parent=(t - 1) * num_candidates + previous[slots[k]] if t else -1,
                slot=slots[k],  # the running beam it extends: its beam_indices entry, less prompt * B
                beam=survivors.index(k) if k in survivors else -1,  # the running beam it becomes
            ))
    return nodes


def _returned(trace: Trace, prompt: int, nodes: list[dict], tokenizer) -> list[dict]:
    """The returned hypotheses, best first: last node, node path from step 0, decoded text."""
    num_candidates, out = trace.steps[0].token.shape[1], []
    for step, candidate in trace.returned[prompt] if prompt < len(trace.returned) else []:
        path = [t * num_candidates + k for t, k in enumerate(trace.path(step, prompt, candidate))]
        tokens = [nodes[n]["token"] for n in path]
        text = tokenizer.decode(tokens) if tokenizer is not None else " ".join(map(str, tokens))
        out.append(dict(node=path[-1], path=path, text=text, score=nodes[path[-1]]["score"]))
    return out


def _running_child(trace: Trace, prompt: int, step: int, slot: int, token: int) -> tuple[int, int]:
    """(node id, running beam slot) of the candidate of `step` that extends beam `slot` by `token` and runs
    on; (-1, -1) when there is none. A step's candidates are distinct (slot, token) pairs."""
    if step >= len(trace.steps):
        return -1, -1
    s = trace.steps[step]
    hits = ((s.parent[prompt] == slot) & (s.token[prompt] == token)).nonzero()[:, 0].tolist()
    survivors = s.survivors[prompt].tolist()
    if not hits or hits[0] not in survivors:
        return -1, -1
    return step * s.token.shape[1] + hits[0], survivors.index(hits[0])


def _draft_matches(trace: Trace, draft: DraftRound, depths: list[int]) -> list[int]:
    """Per drafted node, the node id of the running candidate it became (kept nodes), else -1: a kept node
    at depth d is a candidate of step `draft.step + d - 1`, under its parent's beam slot."""
    match, slots = [], []  # slots: per node, the running beam slot it is at its step (a root: its own)
    for n, (token, parent) in enumerate(zip(draft.tokens, draft.parents)):
        found, slot = -1, draft.beams[n] if parent < 0 else -1
        if parent >= 0 and draft.kept[n] and slots[parent] >= 0:
            found, slot = _running_child(trace, draft.prompt, draft.step + depths[n] - 1, slots[parent], token)
        match.append(found)
        slots.append(slot)
    return match


def _drafts(trace: Trace, prompt: int, texts: _Texts) -> list[dict]:
    rounds = []
    for draft in (d for d in trace.drafts if d.prompt == prompt):
        depths = []
        for parent in draft.parents:
            depths.append(depths[parent] + 1 if parent >= 0 else 0)
        rounds.append(dict(
            step=draft.step, tokens=draft.tokens, parents=draft.parents, beams=draft.beams, kept=draft.kept,
            depths=depths, texts=[texts(t) for t in draft.tokens], labels=[label(texts(t)) for t in draft.tokens],
            match=_draft_matches(trace, draft, depths),
        ))
    return rounds


def trace_data(trace: Trace, tokenizer=None) -> dict:
    """Everything the page draws, per prompt: nodes, returned hypotheses, draft rounds."""
    texts, prompts = _Texts(tokenizer), []
    for prompt in range(trace.steps[0].token.shape[0]):
        nodes = _nodes(trace, prompt, texts)
        prompts.append(dict(nodes=nodes, returned=_returned(trace, prompt, nodes, tokenizer),
                            drafts=_drafts(trace, prompt, texts)))
    return dict(num_steps=len(trace.steps), num_candidates=trace.steps[0].token.shape[1],
                num_beams=trace.steps[0].survivors.shape[1], prompts=prompts)


def embed_json(data: dict) -> str:
    """JSON safe inside a <script> element: '<', '>' and '&' as \\u escapes, so that no token's text can
    close the element or open a comment; JSON.parse and json.loads read them back unchanged."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


def _asset(name: str) -> str:
    return resources.files("specbeam").joinpath(name).read_text(encoding="utf-8")


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>specbeam beam trace</title>
<style>
{css}
</style>
</head>
<body>
<header id="bar"></header>
<section id="returned"></section>
<div id="view"><svg id="tree" xmlns="http://www.w3.org/2000/svg"><g id="scene"></g></svg><div id="tip"></div></div>
<script type="application/json" id="trace-data">{data}</script>
<script>
{js}
</script>
</body>
</html>
"""


def html_page(trace: Trace, tokenizer=None) -> str:
    return PAGE.format(css=_asset("trace_view.css"), js=_asset("trace_view.js"),
                       data=embed_json(trace_data(trace, tokenizer)))


def write_html(trace: Trace, tokenizer, path: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(html_page(trace, tokenizer))
    return str(path)
