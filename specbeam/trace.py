"""The beam-search trace: every step's candidates with their parent beam, token, score and fate — the full
backpointer tree that transformers does not return — and `render`, which draws it as text or PNG."""
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
class Trace:
    steps: list[TraceStep] = field(default_factory=list)

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

