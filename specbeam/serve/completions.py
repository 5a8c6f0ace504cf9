"""`/v1/completions`: a raw prompt (text or token ids), text back; `echo` puts the prompt in front."""
from specbeam.serve.api_format import ApiFormat
from specbeam.serve.logprobs import completion_logprobs
from specbeam.serve.params import Budget, ParamError
from specbeam.serve.rows import RowDelta
from specbeam.serve.schemas import CompletionChoice, CompletionRequest, CompletionResponse


class Completions(ApiFormat):
    id_prefix = "cmpl"
    body: CompletionRequest

    def prompt_ids(self) -> list[int]:
        if self.body.echo and self.body.logprobs is not None:
            raise ParamError("echo with logprobs is not supported: the prompt's log-probabilities are not computed",
                             "echo")
        prompt = self.body.prompt
        return list(prompt) if isinstance(prompt, list) else self.server.tokenizer(prompt).input_ids

    def budget(self, prompt_len: int) -> Budget:
        return Budget(prompt_len, self.body.max_tokens)

    def top_logprobs(self) -> int | None:
        return self.body.logprobs

    def prompt_text(self) -> str:
        prompt = self.body.prompt
        return prompt if isinstance(prompt, str) else self.server.tokenizer.decode(prompt)

    def opening(self, generation) -> list[CompletionResponse]:
        if not self.body.echo:
            return []
        text = self.prompt_text()
        return [CompletionResponse(**self.envelope(generation), choices=[CompletionChoice(index=i, text=text)])
                for i in range(len(generation.rows))]

    def chunks(self, generation, deltas: list[RowDelta]) -> list[CompletionResponse]:
        return [CompletionResponse(**self.envelope(generation), choices=[self._choice(d)]) for d in deltas]

    def usage_chunk(self, generation) -> CompletionResponse:
        return CompletionResponse(**self.envelope(generation), choices=[], usage=self.usage(generation))

    def response(self, generation) -> CompletionResponse:
        prefix = self.prompt_text() if self.body.echo else ""
        whole = [RowDelta(row.index, prefix + row.text, 0, row.entries[: row.completion_tokens], row.finish_reason)
                 for row in generation.rows]
        return CompletionResponse(**self.envelope(generation), choices=[self._choice(d) for d in whole],
                                  usage=self.usage(generation))

    def _choice(self, delta: RowDelta) -> CompletionChoice:
        logprobs = None
        if self.body.logprobs is not None:
            logprobs = completion_logprobs(delta.logprobs, self.server.tokenizer, delta.text_offset)
        return CompletionChoice(index=delta.index, text=delta.text, logprobs=logprobs,
                                finish_reason=delta.finish_reason)
