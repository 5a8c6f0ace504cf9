"""transformers' logits processors applied at many positions at once: each entry of logits with its own
prefix. Processors take a rectangular `input_ids` and may keep per-row state (the repetition penalty keeps
each row's padding length), so every call is a full batch in row order: entries are grouped by prefix length
into layers that use each row at most once, and rows without an entry get a stand-in whose result is dropped.
transformers' repetition penalty, which reads a prefix only as the set of its tokens (ids past the vocabulary
ignored: it marks the padding it skips that way), takes every entry in one call instead: each prefix padded on
the left, and its ignored leading tokens replaced, by the vocabulary's size, for the same penalty without them."""
import inspect
from collections import defaultdict

import torch
import torch.nn.functional as F
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from specbeam.host import as_tensor


class Processors(LogitsProcessorList):
    """A request's logits processors, called as `LogitsProcessorList` calls them without kwargs: each on
    (input_ids, scores) in turn. The list reads every processor's signature on every call; here it is read once,
    and a processor that wants more arguments is refused before any work. `token_sets`, where every processor is
    transformers' repetition penalty: (the same penalties ignoring nothing, per row the leading tokens they ignore);
    else None."""

    def __init__(self, processors: LogitsProcessorList):
        super().__init__(processors)
        for processor in self:
            names = list(inspect.signature(processor.__call__).parameters)
            if len(names) > 2:
                raise ValueError(f"logits_processor: {type(processor).__name__} takes {names}; specbeam passes "
                                 "(input_ids, scores) only")
        self.token_sets = self._token_sets()

    def _token_sets(self) -> tuple[list[RepetitionPenaltyLogitsProcessor], list[int] | int] | None:
        if not self or any(type(p) is not RepetitionPenaltyLogitsProcessor for p in self):  # (a subclass: its own)
            return None
        ignored = [getattr(p, "prompt_ignore_length", None) for p in self]  # (transformers before 4.56: none)
        ignored = [x.tolist() if isinstance(x, torch.Tensor) else x or 0 for x in ignored]
        if any(x != ignored[0] for x in ignored):
            return None
        return [RepetitionPenaltyLogitsProcessor(p.penalty) for p in self], ignored[0]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # [rows, L], [rows, vocab]
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


def _layers(prefixes: list[list[int]], rows: list[int]) -> list[list[int]]:
    """Entry indices grouped so that each group shares a prefix length and uses each row at most once."""
    layers, seen = defaultdict(list), defaultdict(int)  # (prefix length, row) -> entries placed so far
    for entry, (prefix, row) in enumerate(zip(prefixes, rows)):
        depth = seen[len(prefix), row]  # the first layer of this length that does not use the row yet
        seen[len(prefix), row] += 1
        layers[(len(prefix), depth)].append(entry)
    return list(layers.values())


def process_rows(
    processors: Processors,
    prefixes: list[list[int]],  # per entry: the full (left-padded) token sequence before the next token
    logits: torch.Tensor,  # [entries, vocab] float32
    rows: list[int],  # per entry: its row of the batch (beam or sequence)
    num_rows: int,
    log_softmax: bool,  # beam search processes log-probabilities, greedy and sampling raw logits
) -> torch.Tensor:  # [entries, vocab]
    scores = F.log_softmax(logits, dim=-1) if log_softmax else logits
    if not processors:
        return scores
    if processors.token_sets:
        return penalize(processors.token_sets[0], prefixes, skips_of(processors, rows), scores)
    parts, order = [], []
    for layer in _layers(prefixes, rows):
        entry_of_row = [layer[0]] * num_rows  # rows without an entry here take a stand-in of the same length
        for entry in layer:
            entry_of_row[rows[entry]] = entry
        input_ids = as_tensor([prefixes[e] for e in entry_of_row], logits.device)
        processed = processors(input_ids, scores[entry_of_row])  # (indexing by a list copies: theirs to change)
        parts.append(processed[[rows[e] for e in layer]])
        order += layer
    return torch.cat(parts).index_select(0, as_tensor(order, logits.device).argsort())


def penalties_of(processors: Processors) -> tuple[float, ...] | None:
    """The penalties of processors that are transformers' repetition penalties alone (requests with equal ones
    process together: `penalize`), else None."""
    return tuple(p.penalty for p in processors.token_sets[0]) if processors.token_sets else None


def skips_of(processors: Processors, rows: list[int]) -> list[int]:
    """Per entry, given its row: the leading tokens of its prefix that repetition penalties ignore."""
    ignored = processors.token_sets[1]
    return [ignored[r] for r in rows] if isinstance(ignored, list) else [ignored] * len(rows)


def penalize(penalties: list[RepetitionPenaltyLogitsProcessor], prefixes: list[list[int]], skips: list[int],
             scores: torch.Tensor) -> torch.Tensor:  # [entries, vocab] -> [entries, vocab]
    """Repetition penalties ignoring nothing on every entry at once: each prefix padded on the left, and its
    `skips` leading tokens replaced, by the vocabulary's size (an id they ignore)."""
    vocab, width = scores.shape[-1], max(map(len, prefixes))
    input_ids = as_tensor([[vocab] * (width - len(p) + k) + p[k:] for p, k in zip(prefixes, skips)], scores.device)
    scores = scores.clone()  # (a copy: theirs to change)
    for penalty in penalties:
        scores = penalty(input_ids, scores)
    return scores


def tree_prefixes(tokens: list[list[int]], trees: list, rows: list[int]) -> tuple[list[list[int]], list[int]]:
    """Per node of the trees (each with its row's full tokens, the root last, and its row): the node's prefix
    (its row's tokens and its path) and its row."""
    prefixes, entry_rows = [], []
    for row_tokens, tree, row in zip(tokens, trees, rows):
        prefixes += [row_tokens + [tree.tokens[n] for n in tree.path(node)[1:]] for node in range(len(tree))]
        entry_rows += [row] * len(tree)
    return prefixes, entry_rows


def process_trees(
    processors: Processors,
    tokens: list[list[int]],  # per tree: its row's full (left-padded) tokens, the root last
    trees: list,  # DraftTree per row
    logits: list[torch.Tensor],  # per tree: [nodes, vocab] float32
    rows: list[int],  # per tree: its row of the batch
    num_rows: int,
    log_softmax: bool,
) -> list[torch.Tensor]:  # per tree: [nodes, vocab]
    """The processors at every node of draft trees, each node with its own prefix (its row's tokens and the
    node's path)."""
    if not processors and not log_softmax:
        return logits
    prefixes, entry_rows = tree_prefixes(tokens, trees, rows) if processors else ([], [])  # (only for processors)
    processed = process_rows(processors, prefixes, torch.cat(logits), entry_rows, num_rows, log_softmax)
    return list(processed.split([len(t) for t in trees]))
