"""Decoding modes as `generate` arguments: greedy, beam search, sampling."""
from dataclasses import dataclass

from specbeam.config import BEAM, GREEDY, SAMPLE

from specbeam.cli.errors import CliError


@dataclass(frozen=True)
class DecodeMode:
    """One decoding mode. Greedy and beam outputs must equal transformers'; sampled ones only share its law."""

    name: str
    num_beams: int = 1
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self):
        if self.name not in (GREEDY, BEAM, SAMPLE):
            raise CliError(f"mode must be one of {GREEDY}, {BEAM}, {SAMPLE}; got {self.name!r}")
        if (self.name == BEAM) != (self.num_beams > 1):
            raise CliError(f"num_beams must be > 1 exactly for beam search, got {self.num_beams} for {self.name}")

    @property
    def lossless(self) -> bool:
        """Whether specbeam's output must be token for token transformers' own."""
        return self.name != SAMPLE

    @property
    def label(self) -> str:
        return f"beam {self.num_beams}" if self.name == BEAM else self.name

    def generate_kwargs(self) -> dict:
        if self.name == SAMPLE:
            return dict(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        return dict(do_sample=False, num_beams=self.num_beams)


DEFAULT_MODES = {
    GREEDY: DecodeMode(GREEDY),
    BEAM: DecodeMode(BEAM, num_beams=4),
    SAMPLE: DecodeMode(SAMPLE, temperature=0.8, top_p=0.95),
}


def parse_modes(text: str) -> list[DecodeMode]:
    """"greedy,beam,sample" -> the default mode of each name, in the given order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in DEFAULT_MODES]
    if unknown or not names:
        raise CliError(f"--modes takes a comma-separated subset of {','.join(DEFAULT_MODES)}, got {text!r}")
    return [DEFAULT_MODES[name] for name in names]
