"""Draft-tree proposers. A drafter serves many requests at once: each request opens a `session` over its rows,
which answers `propose(rows, ...)` with one `DraftTree` per row and then hears, through `commit`, which path of
which tree each new row continues. `propose` is a generator: it yields each `DraftPass` it needs and is sent
the pass's logits back, so that the engine runs the passes of every request's session as one draft forward.

The draft model keeps its own paged cache (one pool per drafter, shared by every session), with one block table
per row covering the row's tokens except the newest ones (those are fed at the next `propose`). Growing a tree
forks a table per node: a node's table is its parent's plus its own token, so each depth is one decode-style
draft forward, and after verification a row simply keeps the table of the deepest fed node it accepted."""
from dataclasses import dataclass

import torch

from specbeam.beam import NEG
from specbeam.cache import BlockTable
from specbeam.config import EngineConfig, SpecConfig
from specbeam.model_runner import ModelRunner, Work
from specbeam.processing import process_rows
from specbeam.tree import DraftTree
from specbeam.tree_policy import PassCost


@dataclass
class DraftPass:
    """One draft forward that a session needs: its works' logits come back ([sum of their num_logits, vocab])."""

    drafter: "DraftModelDrafter"
    works: list[Work]

    @property
    def num_logits(self) -> int:
        return sum(w.num_logits for w in self.works)


class DraftModelDrafter:
    """A draft model and its paged cache of `num_blocks` blocks."""

    def __init__(self, model, target_vocab_size: int, config: EngineConfig, num_blocks: int,
                 max_bytes: int | None = None, weights: str | None = None):
        """num_blocks: the pool's blocks (twice the target's: a draft tree forks a block per node), within
        max_bytes if given. weights: how the draft's linear weights are read (`SpecConfig.draft_weights`)."""
        vocab = model.config.get_text_config().vocab_size
        if vocab != target_vocab_size:
            raise ValueError(
                f"draft_model has a vocabulary of {vocab} tokens but the target has {target_vocab_size}: "
                "speculative decoding needs the same vocabulary"
            )
        self.runner, self.block_size, self.vocab_size = ModelRunner(model, config, weights), config.block_size, vocab
        if max_bytes is not None:
            num_blocks = min(num_blocks, max_bytes // (self.runner.bytes_per_token() * config.block_size))
        self.cache = self.runner.new_cache(num_blocks, config.block_size)
        self.pass_cost = PassCost()  # seconds of a draft pass by the tokens it feeds

    @property
    def stages(self) -> list["DraftModelDrafter"]:
        """The draft models this drafter runs: itself (a cascade: its stages; prompt lookup: none)."""
        return [self]

    def session(self, num_rows: int) -> "DraftSession":
        return DraftSession(self, num_rows)

    def blocks_needed(self, lengths: list[int], nodes: int) -> dict:
        """Draft blocks a round may take at most, per pool: per row, its tokens (an upper bound on those not
        fed yet) and a block per drafted node (each node's table copies its parent's last block)."""
        return {self.cache: sum(-(-n // self.block_size) + 2 + nodes for n in lengths)}


class DraftSession:
    """One request's rows in the draft's cache."""

    def __init__(self, drafter: DraftModelDrafter, num_rows: int):
        self.drafter, self.cache, self.vocab_size = drafter, drafter.cache, drafter.vocab_size
        self.tables = [BlockTable() for _ in range(num_rows)]
        self.fed: list[dict[int, BlockTable]] = [{} for _ in range(num_rows)]  # per row, this round: node -> table
        self.num_rows, self.passes = num_rows, 0
        self.caught_up = 0  # tokens the last proposal fed besides the roots: those of rounds that did not draft
        self.scored: dict[int, tuple[BlockTable, int]] = {}  # row -> (its scored tree's table, the root's position)

    def behind(self, rows: list[int], lengths: list[int]) -> int:
        """Tokens these rows, of these lengths (root included, padding not), have not fed the draft before their
        roots: what a drafting round would catch up on first."""
        return sum(n - 1 - self.tables[r].length for r, n in zip(rows, lengths))

    def end(self) -> None:
        """Release every block (the request finished, failed or was preempted)."""
        self._release_all()
        self.tables = [BlockTable() for _ in range(self.num_rows)]
        self.fed = [{} for _ in range(self.num_rows)]

    def propose(self, rows, padded, pads, processors, spec, depths, log_softmax, generator=None, sample=None,
                exclude=None, beams=None):
        """rows: drafter row indices; padded: each row's full left-padded tokens, root last; pads: left pads
        per row; depths: the deepest tree each row may grow; exclude: tokens never worth drafting (eos under
        beam search: a beam that ends is a finished hypothesis, never a running beam). One tree per row.
        sample (sampling): processed scores [rows, vocab] -> the probabilities q children are drawn from.

        beams (beam search): per row, (its prompt, its running beam score). Each depth then keeps the `width`
        best nodes per prompt, over all of its beams' trees, by beam score + cumulative draft log-probability:
        the draft's own beam search from the target's beams, which spends the nodes where the target's next
        beams are likely (a beam that is not live, at transformers' impossible score, grows nothing).
        Otherwise each tree keeps its own `width` best."""
        trees = [DraftTree.root_only(p[-1]) for p in padded]
        q = [dict() for _ in rows]  # per tree: node -> the distribution its children were drawn from
        for r in rows:
            self.fed[r] = {0: self.tables[r]}
        groups, base = zip(*beams) if beams else (range(len(rows)), [0.0] * len(rows))
        # (tree, node, beam score + cumulative log q)
        frontier = [(i, 0, base[i]) for i in range(len(rows)) if depths[i] > 0 and base[i] > NEG / 2]
        if not frontier:  # nothing grows: the tokens not fed yet wait for a round that drafts
            return self._with_draft_probs(trees, q, sample)
        # the roots that grow get their tokens not fed yet, root last: logits row k is frontier entry k
        logits = yield from self._feed_roots(rows, padded, pads, [i for i, _, _ in frontier])
        for depth in range(1, max(depths, default=0) + 1):
            prefixes = [padded[i] + [trees[i].tokens[n] for n in trees[i].path(node)[1:]] for i, node, _ in frontier
                        ] if processors else []  # (built only for processors to read)
            scores = process_rows(processors, prefixes, logits.float(), [rows[i] for i, _, _ in frontier],
                                  self.num_rows, log_softmax)
            log_q = torch.log_softmax(scores, dim=-1) if sample is None else sample(scores).log()
            if exclude is not None:
                log_q[:, exclude] = float("-inf")
            if sample:
                for (i, node, _), row in zip(frontier, log_q.exp()):
                    q[i][node] = row
            children = self._expand(frontier, log_q, spec, generator, sample, root=depth == 1, groups=groups)
            frontier = [(i, trees[i].add(node, token), score) for i, node, token, score in children
                        if len(trees[i]) <= spec.node_budget]  # the root plus at most node_budget nodes
            frontier = [f for f in frontier if depths[f[0]] > depth]
            if not frontier:
                break
            logits = yield from self._feed_nodes(rows, trees, [(i, n) for i, n, _ in frontier])
        return self._with_draft_probs(trees, q, sample)

    def score(self, rows, padded, pads, trees: list[DraftTree]):  # a generator -> per tree [nodes, vocab]
        """This draft's logits at every node of given trees (a cascade's stage checking the stage below it), in
        one forward: each row feeds its tokens not fed yet and then its tree (tree-masked), on a fork of its
        table that `commit` cuts down to the path taken."""
        works = []
        for i, tree in enumerate(trees):
            table = self.tables[rows[i]]
            behind = padded[i][pads[i] + table.length:-1]  # not fed yet, before the root (node 0)
            scored = self.cache.fork(table)
            self.scored[rows[i]] = (scored, table.length + len(behind))
            works.append(Work(scored, behind + tree.tokens, len(tree), _positions(len(behind), tree),
                              _parents_after_prefix(len(behind), tree)))
        self.caught_up = sum(len(w.tokens) - len(t) for w, t in zip(works, trees))
        self.passes += 1
        logits = yield DraftPass(self.drafter, works)
        return list(logits.split([len(t) for t in trees]))

    def _feed_roots(self, rows, padded, pads, trees: list[int]):  # a generator -> [len(trees), vocab]
        """Feed the rows of `trees` (indices into `rows`) their tokens not fed yet, root last."""
        tables = [self.tables[rows[i]] for i in trees]
        unfed = [padded[i][pads[i] + t.length:] for i, t in zip(trees, tables)]
        self.caught_up = sum(len(tokens) - 1 for tokens in unfed)
        return (yield from self._forward(tables, unfed))

    def _feed_nodes(self, rows, trees: list[DraftTree], nodes: list[tuple[int, int]]):  # a generator -> [nodes, vocab]
        """Feed each (tree, node) its token on a fork of its parent's table."""
        tables = [self.cache.fork(self.fed[rows[i]][trees[i].parents[n]], borrow=True) for i, n in nodes]
        logits = yield from self._forward(tables, [[trees[i].tokens[n]] for i, n in nodes])
        for (i, n), table in zip(nodes, tables):
            self.fed[rows[i]][n] = table
        return logits

    def _with_draft_probs(self, trees: list[DraftTree], q: list[dict], sample) -> list[DraftTree]:
        """Under sampling, each tree carries the q its children were drawn from ([num_nodes, vocab])."""
        if sample:
            for tree, probs in zip(trees, q):
                tree.draft_probs = _stack_probs(len(tree), probs, self.vocab_size)
        return trees

    def commit(self, origins: list[tuple[int, list[int]]]) -> None:
        """New row i continues old row origins[i][0] along the node path origins[i][1] of its last tree: from the
        deepest node of the path it fed (a row's own table is its root's), or from its scored tree's table (the
        tree went in one pass), of which it keeps the path's K/V. A draft that holds nothing (it has not fed since
        the request began, or since a preemption) has nothing to follow."""
        if not self.scored and not any(self.fed) and not any(table.blocks for table in self.tables):
            return
        sources = []
        for old, path in origins:
            fed = [self.fed[old][n] for n in path if n in self.fed[old]]
            sources.append(self.scored[old][0] if old in self.scored else fed[-1] if fed else self.tables[old])
        new = self.cache.continue_tables(sources, self.tables)
        self.cache.keep_paths([(table, self.scored[old][1], path) for table, (old, path) in zip(new, origins)
                               if old in self.scored])
        self._release_round()
        self.tables, self.fed = new, [{} for _ in new]

    def _release_all(self) -> None:
        self._release_round()
        for table in self.tables:
            self.cache.release(table)

    def _release_round(self) -> None:
        """Drop the node tables of the last round (a row's own table is node 0's: kept) and the scored trees'."""
        for r, nodes in enumerate(self.fed):
            for node, table in nodes.items():
                if node != 0:
                    self.cache.release(table)
            nodes.clear()
        for table, _ in self.scored.values():
            self.cache.release(table)
        self.scored = {}

    def _forward(self, tables: list[BlockTable], tokens: list[list[int]]):  # -> [rows, vocab]
        """Feed each table its tokens (the engine batches the pass with other sessions'); the logits after each
        one's last."""
        self.passes += 1
        return (yield DraftPass(self.drafter, [Work(t, k, num_logits=1) for t, k in zip(tables, tokens)]))

    @staticmethod
    def _expand(frontier, log_q, spec: SpecConfig, generator, sample, root: bool, groups):  # log_q: [frontier, vocab]
        """Children of the frontier: (tree, parent node, token, score), the `width` best per group of trees."""
        if sample:  # i.i.d. draws from q: `width` chains under the root, one child per deeper node
            draws = 1 if not root else spec.width
            probs = log_q.exp().to(generator.device)  # drawn where the request's generator is
            tokens = torch.multinomial(probs, draws, replacement=True, generator=generator).to(log_q.device)
            return [(i, node, int(t), 0.0) for (i, node, _), row in zip(frontier, tokens) for t in row]
        top = torch.topk(log_q, min(spec.branch, log_q.shape[-1]), dim=-1)
        candidates = {}
        for (i, node, score), values, tokens in zip(frontier, top.values.tolist(), top.indices.tolist()):
            candidates.setdefault(groups[i], []).extend((i, node, t, score + v) for v, t in zip(values, tokens))
        return [c for group in candidates.values() for c in sorted(group, key=lambda c: -c[3])[: spec.width]]


def _stack_probs(num_nodes: int, probs: dict, vocab: int) -> torch.Tensor:  # [num_nodes, vocab]
    out = torch.zeros(num_nodes, vocab)
    for node, row in probs.items():
        out[node] = row
    return out


class NgramDrafter:
    """Prompt lookup: find the newest earlier occurrence of the row's last n tokens (n = max_ngram .. 1) and
    propose what followed it, as a chain. No model, no cache."""

    passes = caught_up = 0
    stages = ()  # no draft model

    def __init__(self, vocab_size: int, max_ngram: int = 3):
        self.vocab_size, self.max_ngram = vocab_size, max_ngram
        self.pass_cost = PassCost({1: 0.0})  # no forward: its lookups cost next to nothing

    def session(self, num_rows: int) -> "NgramDrafter":
        return self  # no state per request

    def blocks_needed(self, lengths: list[int], nodes: int) -> dict:
        return {}

    def behind(self, rows: list[int], lengths: list[int]) -> int:
        return 0  # nothing to catch up on

    def end(self) -> None:
        pass

    def commit(self, origins) -> None:
        pass

    def propose(self, rows, padded, pads, processors, spec, depths, log_softmax, generator=None, sample=None,
                exclude=None, beams=None):
        yield from ()  # a generator like every session's propose, that needs no forward
        trees = []
        for tokens, pad, depth in zip(padded, pads, depths):
            tree = DraftTree.root_only(tokens[-1])
            for token in self._lookup(tokens[pad:], depth):
                tree.add(len(tree) - 1, token)
            if sample:  # each child was "drawn" from a point mass on it
                tree.draft_probs = torch.zeros(len(tree), self.vocab_size)
                tree.draft_probs[torch.arange(len(tree) - 1), torch.tensor(tree.tokens[1:], dtype=torch.long)] = 1.0
            trees.append(tree)
        return trees

    def _lookup(self, tokens: list[int], depth: int) -> list[int]:
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            pattern = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start : start + n] == pattern:
                    return tokens[start + n : start + n + depth]
        return []


def _positions(before: int, tree: DraftTree) -> list[int]:  # [before + len(tree)] offsets from the table's length
    return list(range(before)) + [before + d for d in tree.depths()]


def _parents_after_prefix(before: int, tree: DraftTree) -> list[int]:  # [before + len(tree)]
    """A causal chain over the `before` tokens, then the tree under its last one."""
    return list(range(-1, before - 1)) + [p + before if p >= 0 else before - 1 for p in tree.parents]
