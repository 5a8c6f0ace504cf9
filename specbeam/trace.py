"""The beam-search trace: every step's candidates with their parent beam, token, score and fate — the full
backpointer tree that transformers does not return — and `render`, which draws it."""
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


COLORS = {"running": "tab:green", "finished": "tab:blue", "dropped": "lightgray"}


def _label(token: int, tokenizer) -> str:
    return repr(tokenizer.decode([token])) if tokenizer is not None else str(token)


def render_text(trace: Trace, tokenizer=None, prompt: int = 0) -> str:
    lines = []
    for t, s in enumerate(trace.steps):
        lines.append(f"step {t}")
        for k, fate in enumerate(trace.fates(t, prompt)):
            token, parent = int(s.token[prompt, k]), int(s.parent[prompt, k])
            score = float(s.score[prompt, k])
            lines.append(f"  beam {parent} -> {_label(token, tokenizer):>12}  {score:9.4f}  {fate}")
    return "\n".join(lines)


def _node_positions(trace: Trace, prompt: int) -> list[tuple[int, int, int]]:
    """(step, candidate, parent candidate of the previous step or -1) for every candidate."""
    nodes = []
    for t, s in enumerate(trace.steps):
        previous = trace.steps[t - 1].survivors[prompt].tolist() if t > 0 else None
        for k, slot in enumerate(s.parent[prompt].tolist()):
            nodes.append((t, k, previous[slot] if previous is not None else -1))
    return nodes


def render_png(trace: Trace, path: str, tokenizer=None, prompt: int = 0) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_candidates = trace.steps[0].token.shape[1]
    width = min(2 + 1.3 * len(trace.steps), 40)  # inches; a long search is drawn denser, not wider
    fig, ax = plt.subplots(figsize=(width, 1 + 0.45 * num_candidates))
    for t, k, parent in _node_positions(trace, prompt):
        fate = trace.fates(t, prompt)[k]
        if parent >= 0:
            ax.plot([t - 1, t], [parent, k], color=COLORS[fate], lw=0.8, zorder=1)
        ax.scatter([t], [k], color=COLORS[fate], s=30, zorder=2)
        ax.annotate(_label(int(trace.steps[t].token[prompt, k]), tokenizer), (t, k), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("beam step")
    ax.set_ylabel("candidate rank")
    ax.invert_yaxis()
    ax.set_title("beam search tree (green: running, blue: finished, grey: dropped)")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def render(trace: Trace, tokenizer=None, path: str | None = None, prompt: int = 0) -> str:
    """Draw one prompt's beam tree: a PNG at `path` if given (returns the path), else text (returns it)."""
    if not trace.steps:
        raise ValueError("the trace is empty: it comes from a beam search output")
    if path is None:
        return render_text(trace, tokenizer, prompt)
    return render_png(trace, path, tokenizer, prompt)
