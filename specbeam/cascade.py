"""A cascade of drafts (staged speculation): the smallest draft grows the trees; each larger draft then scores
the tree below it and keeps what it would itself have produced, which becomes the tree of the next stage and,
after the last draft, of the target. The target's selection is untouched, so every mode stays exact:

- greedy: a stage keeps the path of the tree that its own argmax follows, then its own argmax after it (a
  chain: what this stage would decode greedily);
- sampling: a stage runs tree speculative sampling on the tree below it, with its own processed distribution p
  and the tree's q; the accepted path and the token drawn after it are an exact sample of the stage's own
  sampling, so the chain it passes on carries p as its q. Whether a node has a child is decided before that
  child is drawn, so the next stage's verification stays exact;
- beam search: a stage keeps the nodes that are among its own top `branch` tokens at their parent (under a
  kept parent): the tree shrinks to what a beam search of this stage would consider.

A chain is cut at the tree's node budget (depth x width) and at its row's depth (a row near max_length drafts
less), so a round never takes more blocks than the scheduler planned. Every stage keeps its own cache and commits
the target's accepted path, translated into the nodes of the tree it fed."""
from collections import Counter

import torch

from specbeam.drafters import DraftModelDrafter, DraftSession
from specbeam.processing import process_trees
from specbeam.tree import DraftTree
from specbeam.tree_policy import SummedPassCost
from specbeam.verification import draw_uniforms, verify_trees


class CascadeDrafter:
    """Draft models from the smallest up, each with its own paged cache."""

    def __init__(self, stages: list[DraftModelDrafter]):
        self.stages = stages
        self.vocab_size = stages[0].vocab_size
        self.pass_cost = SummedPassCost([stage.pass_cost for stage in stages])

    def session(self, num_rows: int) -> "CascadeSession":
        return CascadeSession([stage.session(num_rows) for stage in self.stages])

    def blocks_needed(self, lengths: list[int], nodes: int) -> dict:
        return dict(sum((Counter(stage.blocks_needed(lengths, nodes)) for stage in self.stages), Counter()))


class CascadeSession:
    """One request's rows in every stage's cache."""

    def __init__(self, sessions: list[DraftSession]):
        self.sessions = sessions
        self.maps: list[list[list[int | None]]] = []  # per refining stage, per tree: its node -> the fed tree's
        self.rows: dict[int, int] = {}  # request row -> its tree this round
        self.fed: dict[DraftSession, int] = {}

    @property
    def passes(self) -> int:
        return sum(session.passes for session in self.sessions)

    @property
    def stage_passes(self) -> list[int]:
        return [session.passes for session in self.sessions]

    @property
    def caught_up(self) -> int:
        return max(session.caught_up for session in self.sessions)

    def behind(self, rows: list[int], lengths: list[int]) -> int:
        return max(session.behind(rows, lengths) for session in self.sessions)

    def end(self) -> None:
        for session in self.sessions:
            session.end()

    def propose(self, rows, padded, pads, processors, spec, depths, log_softmax, generator=None, sample=None,
                exclude=None, beams=None, stages: tuple[int, ...] | None = None):
        """The trees of the smallest stage taking part (`stages`, increasing; None: all), as
        `DraftSession.propose`, refined by each larger one in turn."""
        stages = stages or tuple(range(len(self.sessions)))
        first, *later = [self.sessions[s] for s in stages]
        trees = yield from first.propose(rows, padded, pads, processors, spec, depths, log_softmax, generator,
                                         sample, exclude, beams)
        self.rows, self.maps = {r: i for i, r in enumerate(rows)}, []
        # the tree each stage fed this round, as a level of `maps` (absent: it took no part)
        self.fed = {first: 0}
        # a chain holds at most the tree's node budget, and no deeper than its row may draft
        budgets = [min(spec.depth * spec.width, spec.node_budget, depth) for depth in depths]
        for level, session in enumerate(later):
            self.fed[session] = level
            if all(len(t) == 1 for t in trees):
                self.maps.append([[0] for _ in trees])
                continue
            logits = yield from session.score(rows, padded, pads, trees)
            scores = process_trees(processors, padded, trees, [x.float() for x in logits], rows,
                                   session.num_rows, log_softmax)
            if beams is not None:
                trees, maps = zip(*(_top_branch(t, s, spec.branch) for t, s in zip(trees, scores)))
            else:
                trees, maps = _chains(trees, scores, sample, generator, budgets)
            trees, maps = list(trees), list(maps)
            self.maps.append(maps)
        return trees

    def commit(self, origins: list[tuple[int, list[int]]]) -> None:
        """New row i continues old row origins[i][0] along the path origins[i][1] of the target's tree: each
        stage follows it in the nodes of the tree it fed (a stage that took no part fed none)."""
        for session in self.sessions:
            level = self.fed.get(session)
            session.commit([(old, [0] if level is None else self._translate(old, path, level))
                            for old, path in origins])

    def _translate(self, row: int, path: list[int], level: int) -> list[int]:
        """A path in the final tree, as nodes of the tree at `level` (0: the first stage's own, which the second
        scored; k: the tree the (k + 1)-th stage made)."""
        tree = self.rows.get(row)
        if tree is None:
            return [0]
        for maps in reversed(self.maps[level:]):
            path = [maps[tree][n] for n in path if maps[tree][n] is not None]
        return path


def _chains(trees: list[DraftTree], scores: list[torch.Tensor], sample, generator, budgets: list[int]):
    """Greedy or sampling: the path of each tree this stage accepts and its own token after it, as a chain of at
    most `budgets[i]` drafted nodes, with the map of the chain's nodes to the tree's (None: the new token)."""
    paths, next_tokens = verify_trees(trees, scores, sample, draw_uniforms(trees, generator) if sample else None)
    chains, maps = [], []
    for tree, path, token, score, budget in zip(trees, paths, next_tokens, scores, budgets):
        kept = path[: budget + 1]
        chain = DraftTree([tree.tokens[n] for n in kept], list(range(-1, len(kept) - 1)))
        mapping = list(kept)
        if len(kept) <= budget:
            chain.add(len(chain) - 1, token)
            mapping.append(None)
        if sample is not None:  # each chain token was drawn from this stage's p at its parent
            probs = sample(score[kept])
            chain.draft_probs = torch.nn.functional.pad(probs, (0, 0, 0, len(chain) - len(kept)))
        chains.append(chain)
        maps.append(mapping)
    return chains, maps


def _top_branch(tree: DraftTree, scores: torch.Tensor, branch: int) -> tuple[DraftTree, list[int]]:
    """Beam search: the nodes among this stage's top `branch` tokens at their parent, under kept parents."""
    top = torch.topk(scores, min(branch, scores.shape[-1]), dim=-1).indices.tolist()  # [nodes, branch]
    kept, new = DraftTree.root_only(tree.tokens[0]), {0: 0}
    for node in range(1, len(tree)):
        parent = tree.parents[node]
        if parent in new and tree.tokens[node] in top[parent]:
            new[node] = kept.add(new[parent], tree.tokens[node])
    mapping = [None] * len(kept)
    for old, index in new.items():
        mapping[index] = old
    return kept, mapping
