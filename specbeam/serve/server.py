"""What the routes share: the engine (with the draft when there is one), the tokenizer, the model's limits,
the server's queue and its metrics."""
import uuid
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from specbeam.config import SpecConfig
from specbeam.serve.admission import Admission
from specbeam.serve.bridge import Handle, submit
from specbeam.serve.engine_api import Engine
from specbeam.serve.errors import ApiError
from specbeam.serve.metrics import ServerMetrics
from specbeam.serve.params import Limits
from specbeam.serve.rows import TextRules

WARM_UP = [dict(do_sample=False), dict(num_beams=2), dict(do_sample=True)]  # first calls of each mode


@dataclass(frozen=True)
class ServeConfig:
    model_name: str = "specbeam"
    max_num_seqs: int = 64  # sequences (beams, samples) running at once
    max_queue: int = 512  # requests waiting beyond those; more get a 503
    draft_weights: str | None = None  # how the draft's weights are read (`SpecConfig.draft_weights`)

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")


class Server:
    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, draft=None,
                 config: ServeConfig = ServeConfig()):
        """draft: a draft model, "ngram", or None."""
        self.engine = Engine(model, draft_model=draft, spec=SpecConfig(draft_weights=config.draft_weights))
        self.tokenizer, self.config, self.speculative = tokenizer, config, draft is not None
        self.limits = Limits(_context_length(model), config.max_num_seqs)
        generation = model.generation_config
        eos = generation.eos_token_id if generation.eos_token_id is not None else tokenizer.eos_token_id
        self.eos = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.pad = generation.pad_token_id if generation.pad_token_id is not None else tokenizer.pad_token_id
        self.admission = Admission(config.max_num_seqs, config.max_queue)
        self.metrics = ServerMetrics(self.engine.core, self.admission)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise ApiError(404, f"the model {name!r} does not exist: this server serves {self.config.model_name!r}",
                           param="model", code="model_not_found")

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:24]}"

    def text_rules(self, stops: tuple[str, ...]) -> TextRules:
        return TextRules(self.tokenizer, self.eos, self.pad, stops)

    def submit(self, prompt_ids: list[int], kwargs: dict) -> Handle:
        return submit(self.engine, prompt_ids, kwargs)

    async def warm_up(self) -> None:
        """Two tokens in each mode, so that the first request does not pay for first-call costs."""
        prompt = self.tokenizer("def").input_ids or [0]
        for mode in WARM_UP:
            handle = self.submit(prompt, dict(max_new_tokens=2, return_dict_in_generate=True, **mode))
            while not (await handle.next()).finished:
                pass

    def close(self) -> None:
        """Aborts what still runs and stops the engine's loop."""
        self.engine.loop.close()


def _context_length(model: PreTrainedModel) -> int | None:
    config = model.config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None
