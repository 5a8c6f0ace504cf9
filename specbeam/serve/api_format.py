"""What the two generation endpoints share: a request's prompt, plan and usage; each endpoint shapes its
own responses and chunks."""
from abc import ABC, abstractmethod

from pydantic import BaseModel

from specbeam.serve.params import Budget, Plan, plan
from specbeam.serve.rows import RowDelta
from specbeam.serve.schemas import SamplingRequest, Usage


class ApiFormat(ABC):
    id_prefix: str  # of the request ids: "cmpl", "chatcmpl"

    def __init__(self, body: SamplingRequest, server):
        self.body, self.server = body, server

    @abstractmethod
    def prompt_ids(self) -> list[int]:
        """The prompt's token ids; a ParamError / ApiError when it cannot be made."""

    @abstractmethod
    def budget(self, prompt_len: int) -> Budget:
        """The prompt's length and the new tokens asked for, with the fields' names."""

    @abstractmethod
    def top_logprobs(self) -> int | None:
        """Top log-probabilities asked for per token (0: the chosen token's only); None: none."""

    def plan(self, prompt_len: int) -> Plan:
        return plan(self.body, self.budget(prompt_len), self.server.limits, self.top_logprobs(), self.server.tokenizer)

    def opening(self, generation) -> list[BaseModel]:
        """Chunks streamed before any token."""
        return []

    @abstractmethod
    def chunks(self, generation, deltas: list[RowDelta]) -> list[BaseModel]:
        """The streamed chunks of one engine output's deltas."""

    @abstractmethod
    def usage_chunk(self, generation) -> BaseModel:
        """The last chunk when the client asked for usage: no choices, the usage."""

    @abstractmethod
    def response(self, generation) -> BaseModel:
        """The whole answer of a finished request."""

    def envelope(self, generation) -> dict:
        """The fields every response and chunk of a request carries."""
        return dict(id=generation.id, created=generation.created, model=self.server.config.model_name)

    @staticmethod
    def usage(generation) -> Usage:
        prompt, completion = len(generation.prompt_ids), generation.completion_tokens
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
