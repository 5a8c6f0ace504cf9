"""Adaptive draft depth: each round drafts as deep as pays on this machine. Every depth d in 0..max_depth is
an arm (d = 0 is a plain step, a tree of the root alone) whose worth is the decoding steps it advanced per
second of wall time: discounted sums of steps and of seconds over the rounds that ran it, divided. Each untried
depth runs once, deepest first; then the best one runs, and now and then a neighbour of it (one deeper or
shallower: costs drift slowly, and a far depth is an expensive try): a neighbour as fast as the best one round
in `1 / explore`, a slower one less often by the square of its relative speed, since each try costs what
it is slower.

Which depth runs never changes the output (every depth is lossless), only the speed; the policy draws from its
own `random.Random`, never from torch's generators, so seeded sampling stays reproducible."""
import random
from dataclasses import dataclass, field


@dataclass
class DepthPolicy:
    max_depth: int
    explore: float = 0.1  # chance that a round tries a neighbour as fast as the best, to follow costs that drift
    memory: float = 0.95  # discount of the past in each depth's sums
    totals: dict[int, tuple[float, float]] = field(default_factory=dict)  # depth -> (steps, seconds)
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    @property
    def steps_per_second(self) -> dict[int, float]:
        return {depth: steps / max(seconds, 1e-9) for depth, (steps, seconds) in self.totals.items()}

    def choose(self) -> int:
        untried = [d for d in range(self.max_depth, -1, -1) if d not in self.totals]
        if untried:
            return untried[0]
        rates = self.steps_per_second
        best = max(rates, key=rates.get)
        neighbour = min(max(best + self.rng.choice((-1, 1)), 0), self.max_depth)
        if self.rng.random() < self.explore * (rates[neighbour] / max(rates[best], 1e-9)) ** 2:
            return neighbour
        return best

    def record(self, depth: int, steps: int, seconds: float) -> None:
        past_steps, past_seconds = self.totals.get(depth, (0.0, 0.0))
        self.totals[depth] = (self.memory * past_steps + steps, self.memory * past_seconds + seconds)
