"""One returned sequence (an OpenAI choice) as its tokens arrive: its text so far, cut at the first stop
string as OpenAI cuts it, streamed only as far as later tokens cannot change it, and why it ended."""
from dataclasses import dataclass

import torch

from specbeam.serve.logprobs import TokenLogprob, token_logprobs


@dataclass(frozen=True)
class TextRules:
    tokenizer: object
    eos: frozenset[int]
    pad: int | None
    stops: tuple[str, ...]

    def end(self, tokens: list[int]) -> int:
        """How many tokens count: through the first eos, or up to padding (a row that stopped otherwise)."""
        for i, token in enumerate(tokens):
            if token in self.eos:
                return i + 1
            if token == self.pad:
                return i
        return len(tokens)

    def text(self, tokens: list[int]) -> tuple[str, bool]:
        """(the text, whether a stop string cut it)."""
        counted = tokens[: self.end(tokens)]
        if counted and counted[-1] in self.eos:
            counted = counted[:-1]
        text = self.tokenizer.decode(counted, skip_special_tokens=True)
        cuts = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        return (text[: min(cuts)], True) if cuts else (text, False)

    def settled(self, text: str) -> str:
        """The part of an unfinished row's text that later tokens cannot change: without a trailing incomplete
        character or a trailing start of a stop string."""
        text = text.rstrip("\ufffd")
        hold = max((k for stop in self.stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        return text[: len(text) - hold]

    def finish_reason(self, tokens: list[int], stopped: bool) -> str:
        end = self.end(tokens)
        return "stop" if stopped or (end and tokens[end - 1] in self.eos) else "length"


@dataclass
class RowDelta:
    """What one row gained: new text (starting at `text_offset` of its text), the log-probabilities of its new
    tokens, and, on its last delta, why it ended."""

    index: int
    text: str
    text_offset: int
    logprobs: list[TokenLogprob]
    finish_reason: str | None


class Row:
    def __init__(self, index: int, rules: TextRules, top_logprobs: int | None):
        self.index, self.rules, self.top = index, rules, top_logprobs
        self.tokens: list[int] = []
        self.entries: list[TokenLogprob] = []  # log-probabilities of the tokens so far
        self.text = ""  # handed out so far
        self.sent_entries = 0
        self.finish_reason: str | None = None

    @property
    def completion_tokens(self) -> int:
        return self.rules.end(self.tokens)

    def extend(self, tokens: list[int], logits: torch.Tensor | None) -> RowDelta | None:  # [len(tokens), vocab]
        """New tokens of an unfinished row; None when nothing can be handed out yet."""
        self._log(tokens, logits)
        self.tokens += tokens
        text, stopped = self.rules.text(self.tokens)
        return self._delta(text if stopped else self.rules.settled(text))

    def finish(self, tokens: list[int], logits: torch.Tensor | None) -> RowDelta:
        """The row's whole output (those already seen first) and the logits of each token [len(tokens), vocab]."""
        end = self.rules.end(tokens)
        if logits is not None:
            have = len(self.entries)
            self._log(tokens[have:end], logits[have:end])
        self.tokens = tokens
        text, stopped = self.rules.text(tokens)
        self.finish_reason = self.rules.finish_reason(tokens, stopped)
        return self._delta(text)

    def _log(self, tokens: list[int], logits: torch.Tensor | None) -> None:
        if self.top is not None and logits is not None:
            self.entries += token_logprobs(logits, tokens, self.top)

    def _delta(self, text: str) -> RowDelta | None:
        new = text[len(self.text):] if text.startswith(self.text) else ""
        entries = self.entries[self.sent_entries: self.completion_tokens]
        if not new and not entries and self.finish_reason is None:
            return None
        delta = RowDelta(self.index, new, len(self.text), entries, self.finish_reason)
        self.text += new
        self.sent_entries += len(entries)
        return delta
