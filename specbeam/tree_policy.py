"""Trees sized by cost: each round drafts the tree shape (depth D, width w) with the most expected tokens per
second, from what is measured on this machine as the engine runs.

- Pass costs. T(n), the seconds of a target forward feeding n tokens, and D(n) of a draft pass: the curve's shape
  is timed once at first use for n = 1 .. 32 (the fastest of three sweeps), linear between those counts and along the
  last slope past them; its scale at each calibrated count follows the forwards nearest to that count since (a
  running mean of measured / shape), linear between the counts too: a machine that slows down or speeds up keeps
  the curve's shape, and what real forwards add to the calibration's (a context to attend, a tree's mask) is
  learnt per size, so that trees' passes do not make a plain step's look dearer than plain steps measure. A
  request that shares a forward with others feeding `load` tokens pays its share, T(load + n) * n / (load + n).
- Acceptance per depth and width. Each drafted depth d ranks its nodes (greedy: by draft probability; sampling:
  the order the verifier tries the root's children). A round tells, for each depth its accepted path reached,
  at which rank the target's token stood there, or that it was not among the w drafted (censored: its rank is
  >= w). The hazard h[d][k] = P(rank = k | rank >= k) counts the rounds that could see rank k at depth d,
  shrunk towards the same rank's rate over all depths, itself shrunk towards a Beta(alpha, beta) prior:
      m_k = (sum_d hits[d][k] + alpha) / (sum_d at_risk[d][k] + alpha + beta)
      h[d][k] = (hits[d][k] + (alpha + beta) m_k) / (at_risk[d][k] + alpha + beta)
      P_d(w) = 1 - prod_{k < w} (1 - h[d][k])          the token is among the first w at depth d
      E(D, w) = sum_{d <= D} prod_{j <= d} P_j(w_j)   accepted drafted tokens per round
  so a depth not drafted yet is expected to accept as the shallower ones do; old rounds fade by `memory`.

A round with u trees (rows; under beam search, prompts with B roots each) of `nodes(D, w)` drafted nodes then
advances u (1 + E(D, w)) tokens in T_share(u (roots + nodes)) plus the draft's share of one pass over the roots and
D - 1 over the frontier; D = 0 is a plain step. That model leaves out the request's own work (planning its trees,
selecting, committing), which on a small model is most of a round: so each shape's rounds are also timed whole, and
the model's rate is multiplied by two measured factors: the tokens they advanced over the tokens the acceptance
model expected, and the seconds the pass costs predicted over the seconds they took (discounted sums, each starting
from some rounds' worth at a prior's word, more for the tokens, which the luck of acceptance makes noisy; for
drafting shapes the prior is the same factor over all drafting rounds, which fades more slowly, so that a shape not
run lately is judged as drafting has paid here so far; for plain steps, the factor over all plain rounds: else,
after a while of drafting, plain steps would be judged by the pass costs alone, without the work they leave out,
and drafting, which carries its own, would win on that alone). The model carries each shape's rate across loads and
batch sizes and ranks the shapes not run yet; the factors correct it where it has run.

Which shape runs never changes the output (every shape is lossless), only the speed; the policy draws from its
own `random.Random`, never from torch's generators, so seeded sampling stays reproducible."""
import bisect
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from specbeam.tree import DraftTree

GREEDY, SAMPLING, BEAMS = "greedy", "sampling", "beams"  # how a mode's trees grow, see `TreeShape`
CALIBRATION_TOKENS = (1, 2, 4, 8, 16, 32)


@dataclass
class PassCost:
    """T(n) = scale(n) * shape(n): seconds a pass feeding n tokens takes."""

    shape: dict[int, float] = field(default_factory=dict)  # tokens -> seconds, as calibrated
    scales: dict[int, float] = field(default_factory=dict)  # per calibrated count: measured / calibrated (1 unseen)
    memory: float = 0.9  # weight of the past in each scale's running mean
    # (the shape it was made of, tokens -> seconds, its counts in order): `_shape`'s memory, renewed with the shape
    _interpolated: tuple[dict, dict, list] = field(default_factory=lambda: ({}, {}, []), repr=False, compare=False)

    def calibrate(self, run: Callable[[int], None], sizes=CALIBRATION_TOKENS, repeats: int = 3) -> None:
        """Time `run(n)` for each size n, `repeats` sweeps over the sizes (the first also warms up), and keep each
        size's fastest: a burst of other work on the machine then spoils one sweep, not one size. More tokens never
        cost less, and a pass costs a constant until the weights' streaming stops hiding the arithmetic, then grows
        about linearly: so each time is capped by those of larger sizes, and only the lower convex hull is kept (a
        time above it met a busy machine)."""
        times = dict.fromkeys(sizes, math.inf)
        for _ in range(repeats):
            for n in sizes:
                start = time.perf_counter()
                run(n)
                times[n] = min(times[n], max(time.perf_counter() - start, 1e-9))
        # more tokens never cost less: a size timed above a larger one met a busy machine
        monotone = {n: min(t for m, t in times.items() if m >= n) for n in times}
        self.shape, self.scales = _lower_convex_hull(monotone), {}

    @property
    def known(self) -> bool:
        return bool(self.shape)

    def record(self, tokens: int, seconds: float) -> None:
        """A pass of `tokens` took `seconds`: the scale at the calibrated count nearest to it moves towards what it
        says."""
        if self.known:
            count = self._nearest(tokens)
            old = self.scales.get(count, 1.0)
            self.scales[count] = self.memory * old + (1 - self.memory) * seconds / max(self._shape(tokens), 1e-12)

    def __call__(self, tokens: float) -> float:
        return self._scale(tokens) * self._shape(tokens)

    def _scale(self, tokens: float) -> float:
        """The scales of the calibrated counts, linear between them and flat past the ends."""
        if not self.scales:
            return 1.0
        counts = self._counts()
        if tokens <= counts[0] or tokens >= counts[-1]:
            return self.scales.get(counts[0] if tokens <= counts[0] else counts[-1], 1.0)
        low, high = self._segment(tokens)
        weight = (tokens - low) / (high - low)
        return (1 - weight) * self.scales.get(low, 1.0) + weight * self.scales.get(high, 1.0)

    def _shape(self, tokens: float) -> float:
        """Linear between the counts calibrated and along the last slope past the largest (remembered per count
        until the shape is calibrated again: the tree policy asks for the same few counts every round)."""
        self._counts()  # (renews the memory with the shape)
        known = self._interpolated[1]
        if tokens not in known:
            known[tokens] = self._interpolate(tokens)
        return known[tokens]

    def _nearest(self, tokens: int) -> int:
        """The calibrated count nearest to `tokens` (the lower on a tie)."""
        counts = self._counts()
        if tokens <= counts[0] or tokens >= counts[-1]:
            return counts[0] if tokens <= counts[0] else counts[-1]
        low, high = self._segment(tokens)
        return low if tokens - low <= high - tokens else high

    def _segment(self, tokens: float) -> tuple[int, int]:
        """The consecutive calibrated counts whose span holds `tokens` (the last two past the largest); for two
        counts or more, and tokens above the smallest."""
        counts = self._counts()
        i = min(bisect.bisect_left(counts, tokens), len(counts) - 1)
        return counts[i - 1], counts[i]

    def _counts(self) -> list[int]:
        """The calibrated counts, in order (remembered with the shape's interpolations)."""
        if self._interpolated[0] is not self.shape:
            self._interpolated = self.shape, {}, sorted(self.shape)
        return self._interpolated[2]

    def _interpolate(self, tokens: float) -> float:
        counts = self._counts()
        if len(counts) == 1 or tokens <= counts[0]:
            return self.shape[counts[0]]
        low, high = self._segment(tokens)
        slope = max(self.shape[high] - self.shape[low], 0.0) / (high - low)
        return self.shape[low] + slope * (tokens - low)

    def share(self, own: float, load: float) -> float:
        """What feeding `own` tokens beside `load` others costs: the pass, split by tokens."""
        return self(own + load) * own / (own + load)


def _coarse(load: float) -> float:
    """`load` to 4 significant bits (within 6% of it): requests beside nearly the same load share one rating of
    the shapes (each request's load is the others' tokens, a little different for each)."""
    mantissa, exponent = math.frexp(load)
    return math.ldexp(round(mantissa * 16) / 16, exponent)


def _lower_convex_hull(points: dict[int, float]) -> dict[int, float]:
    """The points on the lower convex hull of (n, seconds) (Andrew's monotone chain, lower half)."""
    hull: list[tuple[int, float]] = []
    for n, y in sorted(points.items()):
        # drop the last point while it lies on or above the segment from the one before it to (n, y)
        while len(hull) >= 2 and _turns_down(hull[-2], hull[-1], (n, y)):
            hull.pop()
        hull.append((n, y))
    return dict(hull)


def _turns_down(a: tuple[int, float], b: tuple[int, float], c: tuple[int, float]) -> bool:
    """Whether b lies on or above the segment from a to c (cross product of b - a and c - a >= 0)."""
    return (b[1] - a[1]) * (c[0] - a[0]) >= (c[1] - a[1]) * (b[0] - a[0])


@dataclass
class Acceptance:
    """Hazards of the target's token's rank among each depth's drafted nodes (module docstring)."""

    max_depth: int
    max_width: int
    prior: tuple[float, float] = (1.0, 1.0)  # Beta(alpha, beta) on each hazard
    memory: float = 0.98  # weight of the past, per round
    hits: list[list[float]] = field(default_factory=list)  # [depth - 1][rank]; changed by record and fade only
    at_risk: list[list[float]] = field(default_factory=list)
    _within: dict[tuple[int, int], float] = field(default_factory=dict, repr=False)  # P_d(w) since the last change

    def __post_init__(self):
        self.hits = self.hits or [[0.0] * self.max_width for _ in range(self.max_depth)]
        self.at_risk = self.at_risk or [[0.0] * self.max_width for _ in range(self.max_depth)]

    def fade(self) -> None:
        """One round passed: older observations weigh less."""
        for counts in (self.hits, self.at_risk):
            for row in counts:
                row[:] = [self.memory * c for c in row]
        self._within.clear()

    def record(self, depth: int, rank: int | None, width: int) -> None:
        """At `depth`, the target's token stood at `rank` among the `width` nodes drafted there (None: not
        among them)."""
        seen = min(width, self.max_width) if rank is None else rank + 1
        for k in range(seen):
            self.at_risk[depth - 1][k] += 1.0
        if rank is not None and rank < self.max_width:
            self.hits[depth - 1][rank] += 1.0
        self._within.clear()

    def hazard(self, depth: int, rank: int) -> float:
        """h[d][k], shrunk towards rank k's rate over every depth (module docstring)."""
        alpha, beta = self.prior
        hits, at_risk = sum(row[rank] for row in self.hits), sum(row[rank] for row in self.at_risk)
        pooled = (hits + alpha) / (at_risk + alpha + beta)
        return (self.hits[depth - 1][rank] + (alpha + beta) * pooled) / (self.at_risk[depth - 1][rank] + alpha + beta)

    def within(self, depth: int, width: int) -> float:
        """P_d(w): the target's token is among the first `width` drafted at `depth` (kept until the counts
        change: every round's choice asks for the same few)."""
        if (depth, width) not in self._within:
            self._within[depth, width] = 1.0 - math.prod(1.0 - self.hazard(depth, k) for k in range(width))
        return self._within[depth, width]

    def expected_accepted(self, widths: list[int]) -> float:
        """E: accepted drafted tokens of a round whose depth d ranks widths[d - 1] nodes."""
        total, reached = 0.0, 1.0
        for depth, width in enumerate(widths, start=1):
            reached *= self.within(depth, width)
            total += reached
        return total


@dataclass(frozen=True)
class TreeShape:
    """How a mode's tree of depth D and width w is laid out: per depth, the nodes the verifier ranks, and how
    many nodes the tree and each draft pass after the first hold, per tree (beam search: per prompt)."""

    kind: str  # GREEDY: top-w per depth, `branch` children per node; SAMPLING: w i.i.d. chains; BEAMS: per prompt
    branch: int = 2
    roots: int = 1  # roots per tree: 1, or the beams of a prompt

    def ranked(self, depth: int, width: int) -> list[int]:
        if self.kind == GREEDY:
            return [min(width, self.branch**d) for d in range(1, depth + 1)]
        if self.kind == SAMPLING:  # the root's w children are tried in turn; deeper, a chain's one child
            return [width] + [1] * (depth - 1)
        return [1] * depth  # beam search: a prompt's replay goes on past depth d or not

    def nodes(self, depth: int, width: int) -> int:
        if self.kind == GREEDY:
            return sum(self.ranked(depth, width))
        return depth * width

    def observations(self, tree: DraftTree, path: list[int]) -> list[tuple[int, int | None, int]]:
        """Where the target's token stood at each depth that the accepted `path` (node indices, root first)
        reached, and at the first drafted depth where it was missing: (depth, rank or None, nodes ranked there).
        Greedy ranks all of a depth's nodes in the tree's order (by cumulative draft probability); sampling, the
        children of the path's node, in the order the verifier tries them."""
        depth_of, seen = tree.depths(), []
        for depth in range(1, max(depth_of) + 1):
            ranked = [n for n in range(1, len(tree)) if depth_of[n] == depth
                      and (self.kind == GREEDY or tree.parents[n] == path[depth - 1])]
            if not ranked:
                break
            rank = ranked.index(path[depth]) if depth < len(path) else None
            seen.append((depth, rank, len(ranked)))
            if rank is None:
                break
        return seen


class RoundSums(NamedTuple):
    """Discounted sums over rounds: the tokens they advanced and the seconds they took, beside what the models
    expected of them (the acceptance model's tokens, the pass costs' seconds). (A named tuple: made twice a
    round, it costs a third of a frozen dataclass.)"""

    tokens: float = 0.0
    expected: float = 0.0
    seconds: float = 0.0
    predicted: float = 0.0

    def add(self, memory: float, tokens: float, expected: float, seconds: float, predicted: float) -> "RoundSums":
        return RoundSums(memory * self.tokens + tokens, memory * self.expected + expected,
                         memory * self.seconds + seconds, memory * self.predicted + predicted)


@dataclass
class TreePolicy:
    """Chooses each round's (depth, width) for one drafter and one mode (module docstring)."""

    shape: TreeShape
    acceptance: Acceptance
    target: PassCost
    draft: PassCost
    widths: tuple[int, ...]  # the widths to choose from, increasing
    explore: float = 0.02  # chance that a round tries a neighbour of the best shape as fast as it
    memory: float = 0.97  # weight of the past, per round, in every shape's sums
    pool_memory: float = 0.995  # the same for the sums over every drafting shape's rounds
    token_evidence: float = 8.0  # rounds' worth that a shape's tokens outweigh their prior by (they are noisy)
    cost_evidence: float = 2.0  # rounds' worth that a shape's seconds outweigh their prior by
    stay: float = 0.95  # a request stepping plainly keeps doing so while that is at least this share of the best
    measured: dict[tuple[int, int], RoundSums] = field(default_factory=dict)  # per shape, as of faded_at[shape]
    faded_at: dict[tuple[int, int], int] = field(default_factory=dict)  # per shape: `clock` when last written
    clock: int = 0  # rounds observed with both pass costs known
    pooled: RoundSums = RoundSums()  # over the rounds of every drafting shape
    pooled_plain: RoundSums = RoundSums()  # over the plain rounds
    refresh: int = 64  # plain rounds the rates are reused for (a drafting round, which teaches more, renews them)
    # rounds a request's choice of plain steps holds before it chooses again (unless the choice was a probe of a
    # neighbour, `holds` after `choose`): a choice costs more than a plain step's own work on a small model, and
    # a plain request keeps stepping plainly unless drafting wins clearly
    hold: int = 8
    holds: bool = field(default=True, repr=False, compare=False)
    max_backoff: int = 4  # halvings of a probe's chance at most (one per probe from plain steps that did not pay:
    # after it, drafting's best rate still does not beat plain steps' by the margin `stay` asks of a switch)
    probe_backoff: int = 0  # probes from plain steps since drafting last paid after one, up to max_backoff
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    # (trees, load) -> ({shape: rate}, best, {shape: seconds}), `_rated`
    _rates: dict = field(default_factory=dict, repr=False, compare=False)
    _ratios: dict = field(default_factory=dict, repr=False, compare=False)  # shape -> ratio, reused with the rates
    _plain_rounds: int = 0  # observed since the rates were renewed

    def expected(self, depth: int, width: int, trees: int, load: float) -> tuple[float, float]:
        """(tokens, seconds) that a round of `trees` trees of this shape beside `load` other tokens is expected
        to advance and to take, by the acceptance and the pass costs alone."""
        roots, tokens = trees * self.shape.roots, float(trees)
        seconds = self.target.share(roots + trees * self.shape.nodes(depth, width), load)
        if depth:
            tokens += trees * self.acceptance.expected_accepted(self.shape.ranked(depth, width))
            seconds += self.draft.share(roots, load) + (depth - 1) * self.draft.share(trees * width, load)
        return tokens, seconds

    def ratio(self, depth: int, width: int, unit: tuple[float, float] | None = None) -> float:
        """The measured rate of this shape's rounds over the modelled one, as two factors: the tokens they
        advanced over the tokens expected, and the seconds predicted over the seconds taken. Each starts from
        its evidence's worth of one-tree rounds at a prior's word: for a drafting shape, the factor over every
        drafting round (a shape not run lately is judged as drafting has paid here so far); for plain steps, the
        factor over every plain round."""
        sums = self.sums((depth, width))
        tokens, seconds = unit or self.expected(depth, width, 1, 0)  # a one-tree round: the evidence's unit
        token_prior, cost_prior = _factors(self.pooled if depth else self.pooled_plain)
        t, c = self.token_evidence * tokens, self.cost_evidence * seconds
        return ((sums.tokens + t * token_prior) / (sums.expected + t)
                * (sums.predicted + c * cost_prior) / (sums.seconds + c))

    def sums(self, shape: tuple[int, int]) -> RoundSums:
        """A shape's sums now: every round observed since they were written faded them by `memory` (so that a
        shape not run for a while returns to its prior, and is tried again where that ranks it first, instead
        of keeping a few early, noisy rounds' verdict)."""
        faded = self.memory ** (self.clock - self.faded_at.get(shape, self.clock))
        return self.measured.get(shape, RoundSums()).add(faded, 0, 0, 0, 0)

    def rate(self, depth: int, width: int, trees: int, load: float) -> float:
        """The modelled rate, corrected by what this shape's rounds measured against the model so far: the work
        the model leaves out, per shape."""
        tokens, seconds = self.expected(depth, width, trees, load)
        return self.ratio(depth, width, (tokens, seconds) if (trees, load) == (1, 0) else None) * tokens / seconds

    def choose(self, trees: int, load: float, current: tuple[int, int] | None = None,
               behind: Callable[[], int] | None = None) -> tuple[int, int]:
        """The (depth, width) with the best rate, unless the request's `current` one is a plain step within
        `stay` of it, the best's first round counting the draft's catch-up on the `behind()` tokens it has not
        fed (going from plain steps to drafting costs that; the other way costs nothing: requests sharing a
        policy do not all switch to drafting on a small edge and pay every catch-up in one round); now and then
        a neighbour of the best instead. Before the pass costs are known: the deepest, widest tree."""
        if not (self.target.known and self.draft.known):
            return self.acceptance.max_depth, self.widths[-1]
        rates, best, seconds = self._rated(trees, _coarse(load))
        if best[0] and current in rates and current[0] == 0:  # plain: drafting's first round includes the catch-up
            switching = rates[best] * self._catching_up(best, seconds[best], behind)
            best = current if self.stay * switching <= rates[current] else best
        draw = self.rng.random()
        self.holds = True  # a considered choice, which holds `hold` rounds if it is plain steps; a probe does not
        if draw >= self.explore:  # no neighbour is tried more often than this (relative <= 1)
            return best
        neighbour = self._neighbour(best)
        relative = rates[neighbour] / rates[best]
        self.holds = draw >= self._exploring(neighbour, relative, seconds[neighbour], behind)
        return best if self.holds else neighbour

    def _rated(self, trees: int, load: float) -> tuple[dict, tuple[int, int], dict]:
        """`rate` of every shape beside `load`, the best shape, and each shape's modelled seconds: reused until the
        rates are renewed, and so is each shape's `ratio`, the same for every (trees, load)."""
        if (trees, load) in self._rates:
            return self._rates[trees, load]
        if not self._ratios:
            shapes = [(0, self.widths[0])] + [(d, w) for d in range(1, self.acceptance.max_depth + 1)
                                              for w in self.widths]
            self._ratios = {shape: self.ratio(*shape) for shape in shapes}
        rates, seconds = {}, {}
        for shape, ratio in self._ratios.items():
            tokens, seconds[shape] = self.expected(*shape, trees, load)
            rates[shape] = ratio * tokens / seconds[shape]
        self._rates[trees, load] = rates, max(rates, key=rates.get), seconds
        return self._rates[trees, load]

    def _exploring(self, shape: tuple[int, int], relative: float, seconds: float,
                   behind: Callable[[], int] | None) -> float:
        """The chance of trying a neighbour whose rate is `relative` times the best's: a neighbour as fast runs
        one round in 1 / explore, a slower one less often by the square of its relative speed (each try costs
        what it is slower), and a drafting one less often by the share of its first round that the draft's
        catch-up leaves to drafting, and by half for each probe from plain steps since drafting last paid (where
        the draft does not pay, probes cost their catch-ups and teach nothing new)."""
        catching_up = self._catching_up(shape, seconds, behind)
        backoff = 0.5 ** self.probe_backoff if catching_up < 1 else 1.0
        return self.explore * relative ** 2 * catching_up * backoff

    def _catching_up(self, shape: tuple[int, int], seconds: float, behind: Callable[[], int] | None) -> float:
        """The share of a request's first round of `shape` (modelled to take `seconds`) that is the round itself,
        not the draft catching up on the `behind()` tokens it has not fed (a request that has stepped plainly for
        long, or never drafted, pays for all of them; no one shares the catch-up): 1 for plain steps."""
        unfed = behind() if shape[0] and behind else 0
        if not unfed:
            return 1.0
        return seconds / (seconds + self.draft(unfed))

    def observe(self, depth: int, width: int, trees: int, load: float, tokens: int, seconds: float,
                seen: list[tuple[int, int | None, int]], caught_up: int = 0, rounds: int = 1) -> None:
        """A round of this shape over `trees` trees beside `load` tokens advanced `tokens` in `seconds` (the
        request's share of the round), its draft first catching up on `caught_up` tokens of plain steps before it
        (the cost of switching, not of the shape: the draft's modelled time for them is taken off), and accepted
        as `seen` says ((depth, rank or None, width) observations, `TreeShape.observations`). Plain rounds may
        come `rounds` at a time, their tokens and seconds summed (taken as if they had all ended now)."""
        self._plain_rounds = 0 if depth else self._plain_rounds + rounds
        if depth or self._plain_rounds >= self.refresh:
            self._rates.clear()
            self._ratios.clear()
            self._plain_rounds = 0
        if depth:
            self.acceptance.fade()
            for d, rank, ranked in seen:
                if d <= self.acceptance.max_depth:
                    self.acceptance.record(d, rank, ranked)
        if not (self.target.known and self.draft.known):
            return
        if caught_up:
            roots = trees * self.shape.roots
            seconds -= self.draft.share(roots + caught_up, load) - self.draft.share(roots, load)
            if seconds <= 0:
                return
        self.clock += rounds  # every shape's sums fade by `memory` per round (when read: `sums`)
        expected_tokens, predicted_seconds = self.expected(depth, width, trees, load)
        this_round = (tokens, rounds * expected_tokens, seconds, rounds * predicted_seconds)
        self.measured[depth, width] = self.sums((depth, width)).add(1.0, *this_round)
        self.faded_at[depth, width] = self.clock
        if depth:
            self.pooled = self.pooled.add(self.pool_memory, *this_round)
        else:
            self.pooled_plain = self.pooled_plain.add(self.pool_memory ** rounds, *this_round)
        if depth and caught_up:  # it followed plain steps: did drafting pay, by the margin a switch needs?
            rates, best, _ = self._rated(trees, load)  # (renewed: this round cleared them)
            pays = self.stay * rates[best] > rates[0, self.widths[0]]
            self.probe_backoff = 0 if pays else min(self.probe_backoff + 1, self.max_backoff)

    def _neighbour(self, shape: tuple[int, int]) -> tuple[int, int]:
        depth, width = shape
        i = self.widths.index(width)
        deepest = self.acceptance.max_depth
        options = [(d, width if d else self.widths[0]) for d in (depth - 1, depth + 1) if 0 <= d <= deepest]
        options += [(depth, self.widths[j]) for j in (i - 1, i + 1) if depth and 0 <= j < len(self.widths)]
        return self.rng.choice(options) if options else shape


def _factors(pooled: RoundSums) -> tuple[float, float]:
    """A pool's measured factors: tokens advanced over expected, seconds predicted over taken (1 without rounds)."""
    cost = pooled.predicted / pooled.seconds if pooled.seconds > 0 else 1.0
    return (pooled.tokens + 1) / (pooled.expected + 1), cost


class SummedPassCost:
    """A cascade's draft cost per depth: a pass of each of its stages."""

    def __init__(self, costs: list[PassCost]):
        self.costs = costs

    @property
    def known(self) -> bool:
        return all(cost.known for cost in self.costs)

    def __call__(self, tokens: float) -> float:
        return sum(cost(tokens) for cost in self.costs)

    def share(self, own: float, load: float) -> float:
        return sum(cost.share(own, load) for cost in self.costs)


class StagesPolicy:
    """Which stages of a cascade take part in a round, and its tree. Each non-empty subset of the stages (in
    their order) drafts as a cascade of its own, its trees sized by a `TreePolicy` of its own (its draft cost a
    pass of each of its stages per depth, its acceptance and corrections learnt from its own rounds); the subset
    whose chosen shape has the most expected tokens per second runs. A stage that does not pay is left out."""

    def __init__(self, policies: dict[tuple[int, ...], TreePolicy]):
        self.policies = policies
        self.shape, self.hold = next(iter(policies.values())).shape, next(iter(policies.values())).hold

    def choose(self, trees: int, load: float, current: tuple | None = None,
               behind: Callable[[], int] | None = None) -> tuple[int, int, tuple[int, ...]]:
        """(depth, width, the stages taking part); `current`: the request's (depth, width, stages) now."""
        options = [(policy.choose(trees, load, current[:2] if current and current[2] == stages else None, behind),
                    stages) for stages, policy in self.policies.items()]
        (depth, width), stages = max(options, key=lambda o: self.policies[o[1]].rate(*o[0], trees, load))
        self.holds = self.policies[stages].holds
        return depth, width, stages

    def observe(self, depth: int, width: int, trees: int, load: float, tokens: int, seconds: float, seen: list,
                caught_up: int, stages: tuple[int, ...], rounds: int = 1) -> None:
        self.policies[stages].observe(depth, width, trees, load, tokens, seconds, seen, caught_up, rounds)
