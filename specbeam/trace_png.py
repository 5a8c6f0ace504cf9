"""The beam tree as PNGs for reports, legible at a page's width: the steps are cut into panels of at most
`STEPS_PER_PANEL`, stacked `PANELS_PER_FILE` to an image; a longer search continues in `<stem>-2.png`, ...
Every panel has the same scale, so a token's label is as large in a 500-step search as in a 5-step one."""
from pathlib import Path

from specbeam.trace import Trace, _label

STEPS_PER_PANEL = 24
PANELS_PER_FILE = 4
PAGE_WIDTH = 12.0  # inches, at DPI: 1800 pixels, 75 per step
DPI = 150
COLORS = {"running": "tab:green", "finished": "tab:blue", "dropped": "lightgray"}
MAX_LABEL = 12  # characters; a longer token is cut, so that labels do not run into the next step's


def panel_ranges(num_steps: int) -> list[list[range]]:
    """The steps of each panel, grouped by file."""
    panels = [range(a, min(a + STEPS_PER_PANEL, num_steps)) for a in range(0, num_steps, STEPS_PER_PANEL)]
    return [panels[i : i + PANELS_PER_FILE] for i in range(0, len(panels), PANELS_PER_FILE)]


def file_paths(path: str, count: int) -> list[str]:
    """`path`, then `<stem>-2<suffix>`, `<stem>-3<suffix>`, ..."""
    p = Path(path)
    return [path] + [str(p.with_name(f"{p.stem}-{i}{p.suffix}")) for i in range(2, count + 1)]


def _short(label: str) -> str:
    return label if len(label) <= MAX_LABEL else label[: MAX_LABEL - 1] + "…"


def _draw_panel(ax, trace: Trace, steps: range, tokenizer, prompt: int) -> None:
    """One panel: the candidates of `steps`, with the edges from their parents (those of the step before
    the panel too, so that a branch visibly continues from the previous panel)."""
    for t in steps:
        outcomes = trace.outcomes(t, prompt)
        for k, fate in enumerate(outcomes):
            parent = trace.parent_candidate(t, prompt, k)
            if parent >= 0:
                ax.plot([t - 1, t], [parent, k], color=COLORS[fate], lw=0.8, zorder=1)
            ax.scatter([t], [k], color=COLORS[fate], s=22, zorder=2)
            token = int(trace.steps[t].token[prompt, k])
            ax.annotate(_short(_label(token, tokenizer)), (t, k), fontsize=7, xytext=(3, 3),
                        textcoords="offset points", color="black" if fate != "dropped" else "gray")
    # the same span for every panel, the last one included: one scale throughout
    ax.set_xlim(steps.start - 0.6, steps.start + STEPS_PER_PANEL - 0.4)
    ax.set_xticks(list(steps))
    ax.tick_params(labelsize=7)
    ax.set_ylabel("rank", fontsize=8)
    ax.invert_yaxis()
    ax.set_title(f"steps {steps.start}–{steps.stop - 1}", fontsize=8, loc="left")


def _write_file(trace: Trace, panels: list[range], path: str, tokenizer, prompt: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_candidates = trace.steps[0].token.shape[1]
    height = len(panels) * (0.6 + 0.3 * num_candidates) + 0.4
    fig, axes = plt.subplots(len(panels), 1, figsize=(PAGE_WIDTH, height), squeeze=False)
    for ax, steps in zip(axes[:, 0], panels):
        _draw_panel(ax, trace, steps, tokenizer, prompt)
    axes[-1, 0].set_xlabel("beam step", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def render_png(trace: Trace, path: str, tokenizer=None, prompt: int = 0) -> list[str]:
    """Draw one prompt's beam tree into `path` and, for a long search, the files after it; returns them."""
    groups = panel_ranges(len(trace.steps))
    paths = file_paths(path, len(groups))
    for i, (panels, out) in enumerate(zip(groups, paths)):
        part = f" ({i + 1}/{len(groups)})" if len(groups) > 1 else ""
        title = f"beam search tree{part} — green: running, blue: finished, grey: dropped"
        _write_file(trace, panels, out, tokenizer, prompt, title)
    return paths
