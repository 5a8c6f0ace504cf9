"""transformers' own output classes, with specbeam's `stats` (and `trace` for beam search) added."""
from dataclasses import dataclass, field

from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

from specbeam.trace import Trace


@dataclass
class DecodeStats:
    """Work done by one `generate` call."""

    steps: int = 0  # decoding steps (tokens per sequence, or beam steps)
    target_passes: int = 0  # target forwards, the prefill included
    draft_passes: int = 0
    drafted_tokens: int = 0
    accepted_by_depth: list[int] = field(default_factory=list)  # accepted drafted tokens at depth 1, 2, ...
    kv_blocks_peak: int = 0
    kv_bytes_peak: int = 0

    @property
    def tokens_per_pass(self) -> float:
        """Decoding steps advanced per target forward after the prefill."""
        return self.steps / max(self.target_passes - 1, 1)


@dataclass
class SpecbeamOutput(GenerateDecoderOnlyOutput):
    stats: DecodeStats | None = None


@dataclass
class SpecbeamBeamOutput(GenerateBeamDecoderOnlyOutput):
    trace: Trace | None = None
    stats: DecodeStats | None = None
