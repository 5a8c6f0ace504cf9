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
