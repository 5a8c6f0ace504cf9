"""`/v1/chat/completions`: messages through the tokenizer's chat template, an assistant message back."""
from specbeam.serve.api_format import ApiFormat
from specbeam.serve.errors import ApiError
from specbeam.serve.logprobs import chat_logprobs
from specbeam.serve.params import Budget, ParamError
from specbeam.serve.rows import RowDelta
from specbeam.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Delta,
)


class Chat(ApiFormat):
    id_prefix = "chatcmpl"
    body: ChatCompletionRequest

    def prompt_ids(self) -> list[int]:
        tokenizer = self.server.tokenizer
        if tokenizer.chat_template is None:
            raise ApiError(400, "this model's tokenizer has no chat template, so chat messages cannot be turned into "
                           "a prompt: use /v1/completions with a raw prompt", param="messages",
                           code="no_chat_template")
        messages = [m.as_template_input() for m in self.body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # noqa: BLE001 - a template may raise anything (jinja2's raise_exception)
            raise ParamError(f"messages: the chat template refused them: {error}", "messages") from error
        return tokenizer(text, add_special_tokens=False).input_ids

    def budget(self, prompt_len: int) -> Budget:
        if self.body.max_completion_tokens is not None:
            return Budget(prompt_len, self.body.max_completion_tokens, "messages", "max_completion_tokens")
        return Budget(prompt_len, self.body.max_tokens, "messages", "max_tokens")

    def top_logprobs(self) -> int | None:
        if self.body.top_logprobs is not None and not self.body.logprobs:
            raise ParamError("top_logprobs needs logprobs: true", "top_logprobs")
        return (self.body.top_logprobs or 0) if self.body.logprobs else None

    def opening(self, generation) -> list[ChatCompletionChunk]:
        return [ChatCompletionChunk(**self.envelope(generation), choices=[
            ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))]) for i in range(len(generation.rows))]

    def chunks(self, generation, deltas: list[RowDelta]) -> list[ChatCompletionChunk]:
        return [ChatCompletionChunk(**self.envelope(generation), choices=[ChatChunkChoice(
            index=d.index, delta=Delta(content=d.text), logprobs=self._logprobs(d.logprobs),
            finish_reason=d.finish_reason)]) for d in deltas]

    def usage_chunk(self, generation) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.envelope(generation), choices=[], usage=self.usage(generation))

    def response(self, generation) -> ChatCompletionResponse:
        choices = [ChatChoice(index=row.index, message=AssistantMessage(content=row.text),
                              logprobs=self._logprobs(row.entries[: row.completion_tokens]),
                              finish_reason=row.finish_reason) for row in generation.rows]
        return ChatCompletionResponse(**self.envelope(generation), choices=choices, usage=self.usage(generation))

    def _logprobs(self, entries):
        return chat_logprobs(entries, self.server.tokenizer) if self.body.logprobs else None
