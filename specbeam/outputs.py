"""transformers' own output classes, with specbeam's `stats` (and `trace` for beam search) added."""
from dataclasses import dataclass

from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

from specbeam.stats import DecodeStats
from specbeam.trace import Trace


@dataclass
class SpecbeamOutput(GenerateDecoderOnlyOutput):
    stats: DecodeStats | None = None


@dataclass
class SpecbeamBeamOutput(GenerateBeamDecoderOnlyOutput):
    trace: Trace | None = None
    stats: DecodeStats | None = None


@dataclass
class RequestOutput:
    """What one `EngineCore.step` did for one request."""

    request_id: str
    new_token_ids: list[list[int]]  # per row (sequence): tokens committed this step; beam search: none until the end
    new_logits: list | None = None  # per row [n_new, vocab] raw logits of those tokens, when output_logits=True
    finished: bool = False
    aborted: bool = False
    result: object | None = None  # once finished: exactly what `Engine.generate` returns for the same call
    error: Exception | None = None  # why it failed (it is finished then, and its blocks are free)
