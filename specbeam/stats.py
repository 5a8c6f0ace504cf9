"""What one `generate` call did, and a picture of its acceptance rates."""
from dataclasses import dataclass, field


@dataclass
class DecodeStats:
    steps: int = 0  # decoding steps: tokens of the longest sequence, or beam steps
    target_passes: int = 0  # target forwards, the prefill included
    draft_passes: int = 0
    drafted_tokens: int = 0
    rounds: int = 0  # speculative rounds: one per sequence per pass (per batch of beams under beam search)
    accepted_by_depth: list[int] = field(default_factory=list)  # rounds that accepted >= d + 1 drafted tokens
    stage_passes: list[int] = field(default_factory=list)  # a cascade's draft passes per stage, smallest first
    routed_to: int | None = None  # under the early-exit router: the draft stage that answered (None: the target)
    kv_blocks_peak: int = 0
    kv_bytes_peak: int = 0

    def add(self, other: "DecodeStats") -> None:
        """Count another run's passes, drafts and acceptance into these."""
        for name in ("steps", "target_passes", "draft_passes", "drafted_tokens", "rounds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.accepted_by_depth = _add(self.accepted_by_depth, other.accepted_by_depth)
        self.stage_passes = _add(self.stage_passes, other.stage_passes)

    @property
    def tokens_per_pass(self) -> float:
        """Decoding steps advanced per target forward after the prefill."""
        return self.steps / max(self.target_passes - 1, 1)

    def acceptance_by_depth(self) -> list[float]:
        """Fraction of rounds whose draft was accepted at least to depth d, for d = 1, 2, ..."""
        return [count / max(self.rounds, 1) for count in self.accepted_by_depth]

    def mean_accepted(self) -> float:
        """Drafted tokens accepted per round."""
        return sum(self.accepted_by_depth) / max(self.rounds, 1)


def plot_acceptance(stats: dict[str, DecodeStats], path: str) -> str:
    """Bar chart of acceptance by draft depth, one series per labelled run; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(len(stats), 1)
    for i, (label, s) in enumerate(stats.items()):
        rates = s.acceptance_by_depth()
        offset = (i - (len(stats) - 1) / 2) * width  # the series of one depth sit side by side around it
        ax.bar([d + 1 + offset for d in range(len(rates))], rates, width=width,
               label=f"{label} ({s.mean_accepted():.2f} accepted/round)")
    ax.set_xticks(range(1, 1 + max((len(s.accepted_by_depth) for s in stats.values()), default=0)))
    ax.set_xlabel("draft depth d")
    ax.set_ylabel("P(accepted to depth >= d)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def _add(a: list[int], b: list[int]) -> list[int]:
    """Elementwise sum, the shorter list padded with zeros."""
    length = max(len(a), len(b))
    return [x + y for x, y in zip(a + [0] * (length - len(a)), b + [0] * (length - len(b)))]
