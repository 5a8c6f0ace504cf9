"""The beam-search trace: every step's candidates with their parent beam, token, score and fate — the full
backpointer tree that transformers does not return — the hypotheses the search returned, and, for a
speculative run, what the draft proposed each round. `render` draws it as text or PNG, `to_html` as an
interactive page."""
from dataclasses import dataclass, field

import torch


@dataclass
class TraceStep:
    """One beam step; K candidates per prompt, B running beams."""

    parent: torch.Tensor  # [batch, K] running-beam slot (0..B-1) each candidate extends
    token: torch.Tensor  # [batch, K]
    score: torch.Tensor  # [batch, K] accumulated log-probability
    survivors: torch.Tensor  # [batch, B] candidate index of each next running beam, in beam-slot order
    finished: torch.Tensor  # [batch, K] bool: entered the finished hypotheses


@dataclass
class DraftRound:
    """The draft trees of one prompt's running beams in one speculative round, as one forest."""

    step: int  # the beam step the round's first replayed step is
    prompt: int
    tokens: list[int]  # per node; a root is its running beam's last token
    parents: list[int]  # per node: index of its parent node, -1 for a root
    beams: list[int]  # per node: the running beam slot (0..B-1) its root is
    kept: list[bool]  # per node: the target's replay walked through it (every root is)


@dataclass
class Trace:
    steps: list[TraceStep] = field(default_factory=list)
    # per prompt, (step, candidate) of the last node of each returned hypothesis, best first
    returned: list[list[tuple[int, int]]] = field(default_factory=list)
    drafts: list[DraftRound] = field(default_factory=list)  # speculative runs only

    def fates(self, step: int, prompt: int) -> list[str]:
        """'running', 'finished' or 'dropped' for each candidate of one step and prompt."""
        s = self.steps[step]
        running = set(s.survivors[prompt].tolist())
        fate = ["finished" if f else "dropped" for f in s.finished[prompt].tolist()]
        return ["running" if k in running else f for k, f in enumerate(fate)]

    def outcomes(self, step: int, prompt: int) -> list[str]:
        """What the views show: `fates`, except that a candidate that entered the finished hypotheses is
        'finished' even when it is also a survivor (when every candidate stops, the survivors are picked among
        stopped ones), and that nothing runs on after the last step: the search ended there."""
        finished, end = self.steps[step].finished[prompt].tolist(), step == len(self.steps) - 1
        fates = ["dropped" if end and fate == "running" else fate for fate in self.fates(step, prompt)]
        return ["finished" if f else fate for f, fate in zip(finished, fates)]

    def parent_candidate(self, step: int, prompt: int, candidate: int) -> int:
        """The candidate of the previous step that this one extends; -1 at step 0 (it extends the prompt)."""
        if step == 0:
            return -1
        slot = int(self.steps[step].parent[prompt, candidate])
        return int(self.steps[step - 1].survivors[prompt, slot])

    def path(self, step: int, prompt: int, candidate: int) -> list[int]:
        """The candidate index at every step 0..step of the hypothesis ending at (step, candidate)."""
        candidates = [candidate]
        for t in range(step, 0, -1):
            candidates.append(self.parent_candidate(t, prompt, candidates[-1]))
        return candidates[::-1]

    def mark_returned(self, sequences: torch.Tensor, beam_indices: torch.Tensor, prompt_len: int) -> None:
        """Fill `returned` from a search's results (sequences [batch * n, length], beam_indices
        [batch * n, generated]). A hypothesis' last node is the finished candidate of its last step with its
        last token and parent slot: a step's candidates are distinct (slot, token) pairs."""
        batch = self.steps[0].token.shape[0] if self.steps else 0
        per_prompt = sequences.shape[0] // max(batch, 1)
        beams = self.steps[0].survivors.shape[1] if self.steps else 1
        self.returned = [[] for _ in range(batch)]
        for row in range(sequences.shape[0]):
            prompt, length = row // per_prompt, int((beam_indices[row] >= 0).sum())
            if length == 0:
                continue  # a placeholder: no hypothesis finished
            s = self.steps[length - 1]
            slot = int(beam_indices[row, length - 1]) - prompt * beams
            match = (s.parent[prompt] == slot) & (s.token[prompt] == sequences[row, prompt_len + length - 1])
            candidates = (match & s.finished[prompt]).nonzero()[:, 0].tolist()
            if candidates:
                self.returned[prompt].append((length - 1, candidates[0]))


def token_text(token: int, tokenizer) -> str:
    """A token's text as the tokenizer decodes it alone; its id without a tokenizer."""
    return tokenizer.decode([token]) if tokenizer is not None else str(token)


def _label(token: int, tokenizer) -> str:
    return repr(token_text(token, tokenizer)) if tokenizer is not None else str(token)


def render_text(trace: Trace, tokenizer=None, prompt: int = 0) -> str:
    lines = []
    for t, s in enumerate(trace.steps):
        lines.append(f"step {t}")
        for k, fate in enumerate(trace.fates(t, prompt)):
            token, parent = int(s.token[prompt, k]), int(s.parent[prompt, k])
            score = float(s.score[prompt, k])
            lines.append(f"  beam {parent} -> {_label(token, tokenizer):>12}  {score:9.4f}  {fate}")
    return "\n".join(lines)


def render(trace: Trace, tokenizer=None, path: str | None = None, prompt: int = 0) -> str:
    """Draw one prompt's beam tree: a PNG at `path` if given (returns the path; a long search continues in
    `<stem>-2.png`, ...: see `specbeam.trace_png`), else text (returns it)."""
    if not trace.steps:
        raise ValueError("the trace is empty: it comes from a beam search output")
    if path is None:
        return render_text(trace, tokenizer, prompt)
    from specbeam.trace_png import render_png

    return render_png(trace, path, tokenizer, prompt)[0]


def to_html(trace: Trace, tokenizer=None, path: str = "trace.html") -> str:
    """Write the interactive view of the whole trace (every prompt) as one self-contained HTML file; returns
    the path. See `specbeam.trace_html`."""
    if not trace.steps:
        raise ValueError("the trace is empty: it comes from a beam search output")
    from specbeam.trace_html import write_html

    return write_html(trace, tokenizer, path)


def draft_rounds(step: int, rows: list[int], trees, walked: list[set[int]], num_beams: int) -> list[DraftRound]:
    """One `DraftRound` per prompt from a speculative beam round: `trees[i]` grew under running beam
    `rows[i]` (flat: prompt * num_beams + slot), `walked[i]` holds its nodes the replay walked through.
    A prompt whose trees drafted nothing gets no round."""
    drafting = {row // num_beams for row, tree in zip(rows, trees) if len(tree) > 1}
    rounds: dict[int, DraftRound] = {}
    for row, tree, nodes in zip(rows, trees, walked):
        prompt = row // num_beams
        if prompt not in drafting:
            continue
        forest = rounds.setdefault(prompt, DraftRound(step, prompt, [], [], [], []))
        offset = len(forest.tokens)  # the tree's node indices, shifted past the trees before it
        forest.tokens += list(tree.tokens)
        forest.parents += [p + offset if p >= 0 else -1 for p in tree.parents]
        forest.beams += [row % num_beams] * len(tree)
        forest.kept += [node in nodes for node in range(len(tree))]
    return [rounds[p] for p in sorted(rounds)]
