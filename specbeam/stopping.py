"""transformers' stopping criteria, read without calling them where that gives the same answer: its max-length
and eos criteria are read off a row's length and newest token; any other criterion is called as transformers
calls it."""
import torch
from transformers import StoppingCriteriaList
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from specbeam.host import as_tensor


class StopCheck:
    """A request's stopping criteria after each new token: on one row's token list (`__call__`), or on beam
    candidates (`hits`, only when there are no `others`)."""

    def __init__(self, criteria: StoppingCriteriaList):
        self.criteria = criteria
        self.max_length = min((c.max_length for c in criteria if _quiet_max_length(c)), default=None)
        eos_ids = [c.eos_token_id.flatten() for c in criteria if type(c) is EosTokenCriteria]
        self.eos = {t for ids in eos_ids for t in ids.tolist()}
        self.eos_ids = torch.cat(eos_ids) if eos_ids else None  # [num_eos]
        self.others = StoppingCriteriaList(
            c for c in criteria if not (_quiet_max_length(c) or type(c) is EosTokenCriteria))

    def __call__(self, tokens: list[int], history, device) -> bool:
        """tokens: the row's so far, the newest last; history() -> the scores the criteria get."""
        stop = (self.max_length is not None and len(tokens) >= self.max_length) or tokens[-1] in self.eos
        if self.others:  # called even when the row stops anyway: a criterion may keep state
            stop = bool(self.others(as_tensor([tokens], device), history())[0]) or stop
        return stop

    def hits(self, tokens: torch.Tensor, lengths: torch.Tensor, max_lengths: torch.Tensor) -> torch.Tensor:
        """What the criteria return for candidates ending in `tokens` ([batch, K] -> bool), each prompt's
        candidates `lengths` long ([batch]): its max length (`max_lengths` [batch], this check's own or, in a
        search joined from several requests, each prompt's request's) reached, or an eos token."""
        hit = (lengths >= max_lengths)[:, None].expand_as(tokens)
        if self.eos_ids is not None:
            hit = hit | torch.isin(tokens, self.eos_ids.to(tokens.device))
        return hit


def _quiet_max_length(criterion) -> bool:
    """transformers' max-length criterion, when it can never warn that the model's positions are exceeded (it
    warns only while a row is longer than max_position_embeddings and shorter than max_length)."""
    limit = getattr(criterion, "max_position_embeddings", None)
    return type(criterion) is MaxLengthCriteria and (limit is None or criterion.max_length <= limit + 1)
