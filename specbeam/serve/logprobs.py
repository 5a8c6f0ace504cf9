"""Log-probabilities of generated tokens from the model's raw logits, and their two OpenAI shapes."""
from dataclasses import dataclass
from itertools import accumulate

import torch

from specbeam.host import as_tensor
from specbeam.serve.schemas import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens and their log-probabilities, best first


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """logits [len(tokens), vocab]: the raw logits each token was chosen from."""
    if not tokens:
        return []
    logp = torch.log_softmax(logits[: len(tokens)].float(), dim=-1)  # [n, vocab]
    chosen = logp.gather(1, as_tensor(tokens, logp.device)[:, None])[:, 0].tolist()
    values, ids = logp.topk(top, dim=-1) if top else (logp[:, :0], logp[:, :0].long())  # [n, top]
    return [TokenLogprob(token, lp, list(zip(i, v)))
            for token, lp, i, v in zip(tokens, chosen, ids.tolist(), values.tolist())]


def completion_logprobs(entries: list[TokenLogprob], tokenizer, text_start: int) -> CompletionLogprobs:
    """The completions API's shape; text offsets count from `text_start`, where the entries' text begins."""
    pieces = [tokenizer.decode([e.token]) for e in entries]
    offsets = list(accumulate(map(len, pieces), initial=text_start))[:-1]
    top = [{tokenizer.decode([t]): lp for t, lp in e.top} for e in entries]
    return CompletionLogprobs(tokens=pieces, token_logprobs=[e.logprob for e in entries], top_logprobs=top,
                              text_offset=offsets)


def chat_logprobs(entries: list[TokenLogprob], tokenizer) -> ChatLogprobs:
    def top(token: int, logprob: float) -> TopLogprob:
        text = tokenizer.decode([token])
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    return ChatLogprobs(content=[
        ChatTokenLogprob(**top(e.token, e.logprob).model_dump(), top_logprobs=[top(t, lp) for t, lp in e.top])
        for e in entries])
