"""transformers' logits processors applied at many positions at once: each row of logits with its own
prefix. Processors take a rectangular `input_ids`, so rows are grouped by prefix length."""
from collections import defaultdict

import torch
import torch.nn.functional as F
from transformers import LogitsProcessorList


def process_rows(
    processors: LogitsProcessorList,
    prefixes: list[list[int]],  # per row: the full (left-padded) token sequence before the next token
    logits: torch.Tensor,  # [rows, vocab] float32
    log_softmax: bool,  # beam search processes log-probabilities, greedy and sampling raw logits
) -> torch.Tensor:  # [rows, vocab]
    scores = F.log_softmax(logits, dim=-1) if log_softmax else logits
    out = torch.empty_like(scores)
    groups = defaultdict(list)
    for row, prefix in enumerate(prefixes):
        groups[len(prefix)].append(row)
    for rows in groups.values():
        input_ids = torch.tensor([prefixes[r] for r in rows], device=logits.device)
        index = torch.tensor(rows, device=logits.device)
        out[index] = processors(input_ids, scores[index])
    return out
