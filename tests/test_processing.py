"""Logits processors at many positions at once: every entry gets exactly what the processors give it alone, on
its own prefix, whether the entries go layer by layer or (the repetition penalty: it reads a prefix as the set of
its tokens) in one call with left-padded prefixes."""
import copy

import pytest
import torch
from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

from specbeam.processing import Processors, process_rows


class Subclassed(RepetitionPenaltyLogitsProcessor):
    """A subclass may read the prefix otherwise: it goes layer by layer."""


def _ignoring_padding(penalty: float) -> RepetitionPenaltyLogitsProcessor:
    """As `generate` builds it: per row, the leading tokens (its left padding) it ignores."""
    processor = RepetitionPenaltyLogitsProcessor(penalty)
    processor.prompt_ignore_length = torch.tensor([0, 3, 1])
    return processor


CASES = {
    "repetition-penalty": ([RepetitionPenaltyLogitsProcessor(1.3)], True),
    "ignoring-padding": ([_ignoring_padding(1.3)], True),
    "ignoring-a-prompt": ([RepetitionPenaltyLogitsProcessor(1.3, prompt_ignore_length=3)], True),
    "two-penalties": ([_ignoring_padding(1.3), _ignoring_padding(0.8)], True),
    "subclass": ([Subclassed(1.3)], False),
    "with-n-grams": ([RepetitionPenaltyLogitsProcessor(1.3), NoRepeatNGramLogitsProcessor(2)], False),
}


@pytest.mark.parametrize("case", CASES)
def test_every_entry_is_processed_as_if_alone(case):
    processors, one_call = CASES[case]
    processors = Processors(LogitsProcessorList(processors))
    assert (processors.token_sets is not None) == one_call
    gen = torch.Generator().manual_seed(0)
    vocab, lengths, rows = 50, [7, 9, 9, 12, 7, 8], [0, 0, 1, 1, 2, 0]  # two entries of row 0 at length 7
    prefixes = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
    logits = torch.randn(len(lengths), vocab, generator=gen, dtype=torch.float64)
    out = process_rows(processors, prefixes, logits, rows, num_rows=3, log_softmax=False)
    for entry, (prefix, row) in enumerate(zip(prefixes, rows)):
        torch.testing.assert_close(out[entry:entry + 1], _alone(processors, prefix, row, logits[entry:entry + 1]),
                                   rtol=0, atol=0)


def _alone(processors, prefix: list[int], row: int, scores: torch.Tensor) -> torch.Tensor:  # [1, vocab]
    """The processors on one row of their batch: each its own row's ignored length."""
    for processor in processors:
        ignored = getattr(processor, "prompt_ignore_length", None)
        if isinstance(ignored, torch.Tensor):
            processor = copy.copy(processor)
            processor.prompt_ignore_length = ignored[row:row + 1]
        scores = processor(torch.tensor([prefix]), scores.clone())
    return scores
