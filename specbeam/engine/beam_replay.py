"""One round of beam search for one or more requests: their searches joined into one, so that every step is one
set of tensor operations over all of their prompts, however many requests they come from.

Each step reads every running beam's distribution off the target pass (its node of its tree), then replays
transformers' beam step. A prompt goes on while every new running beam of it is a tree node; its round ends at
the first step that leaves its trees (the others step on without it), and its request commits it. Requests
join only when a step treats their prompts alike: no logits processors, no stopping criteria but max-length and
eos (`BeamDecoding.kind`); their prompts' limits (width, max length) stay their own."""
import copy
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specbeam.beam import BeamSearch
from specbeam.host import as_tensor
from specbeam.processing import process_rows
from specbeam.trace import TraceStep


@dataclass
class Step:
    """One beam step over some prompts, kept whole: a prompt's part is read when needed."""

    prompts: list  # the ids of the prompts it stepped (a joined search's own)
    scores: torch.Tensor  # [prompts * beams, vocab] processed log-probabilities
    raw: torch.Tensor  # [prompts * beams, vocab] logits
    trace: TraceStep  # [prompts, K] per field ([prompts, B] survivors)

    def part(self, name: str, g: int, count: int = 1) -> torch.Tensor:  # field `name`: prompts g .. g + count - 1
        value = getattr(self, name) if name in ("scores", "raw") else getattr(self.trace, name)
        rows = value.shape[0] // len(self.prompts)
        return value if count == len(self.prompts) else value[g * rows:(g + count) * rows]


class BeamReplay:
    def __init__(self, members: list, logits: torch.Tensor, firsts: list[int]):
        """members: BeamDecoding requests, each with its round's trees; logits: [rows, vocab] holding each
        member's tree nodes from row firsts[k] on."""
        self.members, self.logits = members, logits
        self.first_row = dict(zip(members, firsts))
        searches = [m.search for m in members]
        if len(members) == 1:  # its own prompt ids
            self.owner = {p: (members[0], p) for p in searches[0].prompts}
            self.search = searches[0].whole()
        else:
            self.owner = dict(enumerate((m, p) for m in members for p in m.search.prompts))
            self.search = _rejoined(members) or BeamSearch.merge(searches, list(self.owner))
        self.beams = members[0].params.num_beams

    def run(self) -> dict:
        """Replay the round. Returns per member the parts of its search that run on."""
        group, beams = self.search, self.beams
        # per running beam: (its request, the row it descends from at the round's start, its node path in that
        # row's tree, the last entry the new root's node or None)
        origin = [(m, p * beams + b, [0]) for m, p in map(self.owner.get, group.prompts) for b in range(beams)]
        first = {key: len(m.taken[p]) for key, (m, p) in self.owner.items()}
        drafted = any(len(tree) > 1 for m in self.members for tree in m.trees.values())  # else a plain step
        walked = defaultdict(dict)  # per request, per row: the nodes its beams walked (read where it drafted)
        for m, r, _ in origin if drafted else ():
            walked[m][r] = {0}
        replayed, running_on = 0, defaultdict(list)
        while True:
            index = as_tensor([self.first_row[m] + m.offset[r] + path[-1] for m, r, path in origin], self.logits.device)
            self._step(group, self.logits.index_select(0, index).to(torch.float32))
            replayed += 1
            done = group.prompts_done().tolist()
            origin, inside = _follow(group, origin, drafted)
            for m, r, path in origin if drafted else ():
                walked[m][r].update(node for node in path if node is not None)
            stop = [g for g in range(group.batch) if done[g] or not inside[g]]
            for g in stop:
                m, p = self.owner[group.prompts[g]]
                m.end_round(p, first[group.prompts[g]], replayed, walked[m], done[g])
            for g in (g for g in stop if done[g]):  # (split off now: the group steps on)
                self.owner[group.prompts[g]][0].end_search(self._part(group, [g]).whole())
            by_member = defaultdict(list)
            for g in (g for g in stop if not done[g]):
                by_member[self.owner[group.prompts[g]][0]].append(g)
            tails = group.tail(replayed).tolist() if by_member else []  # per running beam: this round's tokens
            for m, gs in by_member.items():
                rows = [g * beams + b for g in gs for b in range(beams)]
                running_on[m].append(m.commit_beams(self._part(group, gs), [origin[i][1:] for i in rows],
                                                    [tails[i] for i in rows]))
            going = [g for g in range(group.batch) if g not in stop]
            if not going:
                if len(stop) == len(self.owner) and not any(done) and len(self.members) > 1:
                    # every prompt ended its round at this step: the group is whole, each member's part a view of it
                    joined = (tuple(map(id, self.members)), group, tuple(running_on[m][0] for m in self.members))
                    for m in self.members:
                        m.joined = joined
                return running_on
            if stop:
                group, origin = group.split(going), [origin[g * beams + b] for g in going for b in range(beams)]

    def _part(self, group: BeamSearch, gs: list[int]) -> "BeamSearch | SplitLater":
        """The prompts gs of the group as a search of their request, under its own prompt ids (of a joined search:
        split off when it is read)."""
        if len(self.members) == 1:
            return group if len(gs) == group.batch else group.split(gs)
        member = self.owner[group.prompts[gs[0]]][0]
        return SplitLater(group, gs, [self.owner[group.prompts[g]][1] for g in gs], member.params)

    def _step(self, group: BeamSearch, logits: torch.Tensor) -> None:  # [group rows, vocab] their logits
        """One beam step over the group; each member logs its prompts' part of it."""
        member = self.members[0]
        log_probs = F.log_softmax(logits, dim=-1)
        processors = member.request.logits_processor  # (a request with processors steps alone)
        if processors and group.batch * self.beams == len(member.rows) and group.same_length():  # as transformers
            log_probs = processors(group.tail(group.lengths[0]), log_probs)
        elif processors:
            rows = [p * self.beams + b for p in group.prompts for b in range(self.beams)]
            log_probs = process_rows(processors, group.running_sequences(), logits, rows, len(member.rows),
                                     log_softmax=True)
        step = Step(group.prompts, log_probs, logits, group.step(log_probs, member.stop, member.scores_so_far))
        taken = defaultdict(list)  # per member: (index in the group, its prompt) of its prompts in the step
        for g, key in enumerate(group.prompts):
            m, p = self.owner[key]
            taken[m].append((g, p))
        for m, mine in taken.items():
            m.log_step(step, mine)


class SplitLater:
    """Prompts `gs` of a joined search as their request's own search, split off only when it is read (`whole`): a
    search joined again the next round (`_rejoined`) never is. Its group must not step before then."""

    def __init__(self, group: BeamSearch, gs: list[int], prompts: list[int], params):
        self.group, self.gs, self.prompts, self.params, self.batch = group, gs, prompts, params, len(gs)
        self.lengths = group.lengths  # (a step gives the group a new list)

    def whole(self) -> BeamSearch:
        if self.group.lengths is not self.lengths:
            raise RuntimeError("a joined beam search stepped before a request's part of it was split off")
        whole = len(self.gs) == self.group.batch
        part = copy.copy(self.group) if whole else self.group.split(self.gs)  # (the group keeps its own ids)
        part.prompts, part.params = self.prompts, self.params
        return part


def _rejoined(members: list) -> BeamSearch | None:
    """The joined search of the last round, if it joined exactly these requests, in this order, and each still
    holds the part of it that round gave it: it steps on as it is, not merged again (a plain round's, as a rule)."""
    ids, group, parts = members[0].joined or ((), None, ())
    if ids == tuple(map(id, members)) and all(m.search is part for m, part in zip(members, parts)):
        return group
    return None


def _follow(search: BeamSearch, origin: list, drafted: bool) -> tuple[list, list[bool]]:
    """Each new running beam's origin after one more replayed step, and per prompt whether all of its running
    beams are tree nodes (drafted: some tree has more than its root; else every new beam has left them)."""
    parents = search.parents().tolist()
    if not drafted:
        return [(*origin[parent][:2], [0, None]) for parent in parents], [False] * search.batch
    tokens = search.tail(1).flatten().tolist()
    beams = search.params.num_beams
    new, inside = [], [True] * search.batch
    for beam, parent in enumerate(parents):
        member, row, path = origin[parent]
        child = member.trees[row].child(path[-1], tokens[beam])
        inside[beam // beams] &= child is not None
        new.append((member, row, path + [child]))
    return new, inside
