"""OpenAI parameters -> `generate` keyword arguments, with the checks the schema cannot make alone (each error
names the field). Temperature 0 is greedy decoding; `use_beam_search` is exact beam search over
max(n, best_of) beams returning n, sampling parameters ignored."""
from dataclasses import dataclass

import torch

from specbeam.serve.schemas import SamplingRequest

GREEDY_TEMPERATURE = 1e-5  # below it, as in vLLM, decoding is greedy


class ParamError(ValueError):
    """A request field the server refuses before any work: a 400 naming `param`."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Limits:
    context_length: int | None  # prompt + new tokens at most (None: no limit known)
    max_rows: int  # sequences (beams or samples) one request may decode: the server's max-num-seqs


@dataclass(frozen=True)
class Plan:
    """What the engine is asked to do for one request."""

    kwargs: dict  # generate keyword arguments (input_ids aside)
    n: int  # choices returned
    rows: int  # sequences decoded: the beams, or the samples
    mode: str  # for the log: "greedy", "sample", "beam 4"
    max_tokens: int
    logprobs: int | None  # top log-probabilities per token (0: the chosen token's only); None: none
    stops: tuple[str, ...]


@dataclass(frozen=True)
class Budget:
    """How long the prompt is and how much the request asks for, with the fields' names for errors."""

    prompt_len: int
    max_tokens: int | None  # None: up to the context
    prompt_param: str = "prompt"
    max_tokens_param: str = "max_tokens"


def plan(body: SamplingRequest, budget: Budget, limits: Limits, logprobs: int | None, tokenizer) -> Plan:
    _refuse_unsupported(body)
    max_tokens = _max_tokens(budget, limits.context_length)
    stops = _stops(body.stop)
    kwargs = dict(max_new_tokens=max_tokens, return_dict_in_generate=True, output_logits=logprobs is not None)
    if body.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = body.repetition_penalty
    if stops:
        kwargs.update(stop_strings=list(stops), tokenizer=tokenizer)
    mode, rows, decoding = _decoding(body)
    if rows > limits.max_rows:
        param = "best_of" if body.use_beam_search and rows > body.n else "n"
        raise ParamError(f"{param}: this request decodes {rows} sequences, the server at most {limits.max_rows} "
                         "at once (its --max-num-seqs)", param)
    return Plan({**kwargs, **decoding}, body.n, rows, mode, max_tokens, logprobs, stops)


def _refuse_unsupported(body: SamplingRequest) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) != 0:
            raise ParamError(f"{name} is not supported (use repetition_penalty)", name)


def _max_tokens(budget: Budget, context: int | None) -> int:
    if budget.prompt_len == 0:
        raise ParamError(f"{budget.prompt_param} is empty: at least one token is needed", budget.prompt_param)
    if context is None:
        if budget.max_tokens is None:
            raise ParamError(f"{budget.max_tokens_param} is required: the model's context length is unknown",
                             budget.max_tokens_param)
        return budget.max_tokens
    if budget.prompt_len >= context:
        raise ParamError(f"{budget.prompt_param} has {budget.prompt_len} tokens, but the model's context length is "
                         f"{context} tokens: it leaves no room for a new one", budget.prompt_param)
    room = context - budget.prompt_len
    if budget.max_tokens is None:
        return room
    if budget.max_tokens > room:
        raise ParamError(f"{budget.max_tokens_param} is {budget.max_tokens}, but the model's context length is "
                         f"{context} tokens and the prompt has {budget.prompt_len}: at most {room}",
                         budget.max_tokens_param)
    return budget.max_tokens


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not s for s in stops):
        raise ParamError("stop holds an empty string", "stop")
    return stops


def _decoding(body: SamplingRequest) -> tuple[str, int, dict]:
    """(mode for the log, sequences decoded, the mode's generate arguments)."""
    if body.use_beam_search:
        beams = max(body.n, body.best_of or body.n)
        if body.best_of is not None and body.best_of < body.n:
            raise ParamError(f"best_of ({body.best_of}) must be >= n ({body.n})", "best_of")
        return f"beam {beams}", beams, dict(
            do_sample=False, num_beams=beams, num_return_sequences=body.n,
            length_penalty=body.length_penalty, early_stopping=body.early_stopping)
    if body.best_of not in (None, body.n):
        raise ParamError("best_of other than n needs use_beam_search", "best_of")
    if body.temperature < GREEDY_TEMPERATURE:
        if body.n > 1:
            raise ParamError("n > 1 needs temperature > 0 (sampling) or use_beam_search: greedy decoding has "
                             "one answer", "n")
        return "greedy", 1, dict(do_sample=False, num_beams=1)
    sampling = dict(do_sample=True, num_beams=1, temperature=body.temperature, top_p=body.top_p,
                    top_k=max(body.top_k, 0), num_return_sequences=body.n)
    if body.min_p > 0:
        sampling["min_p"] = body.min_p
    if body.seed is not None:
        sampling["generator"] = torch.Generator().manual_seed(body.seed)
    return "sample" if body.n == 1 else f"sample n={body.n}", body.n, sampling
