"""`Engine.generate`: transformers' `model.generate`, same arguments and outputs, over specbeam's paged KV
cache. `patch(model)` routes `model.generate` through an engine; `unpatch(model)` undoes it."""
import warnings

import torch
from transformers import PreTrainedModel

from specbeam.config import BEAM, EngineConfig, SpecConfig
from specbeam.drafters import DraftModelDrafter, NgramDrafter
from specbeam.model_runner import ModelRunner
from specbeam.stats import DecodeStats
from specbeam.request import Request, build_request
from specbeam.scheduler import Scheduler
from specbeam.depth_policy import DepthPolicy
from specbeam.speculative import SpeculativeScheduler
from specbeam.cache import PagedKVCache
from specbeam.validation import UnsupportedOptionError


class Engine:
    """Decoding engine for one target model (and, later, a draft). `options` fill an `EngineConfig`."""

    def __init__(
        self,
        model: PreTrainedModel,
        draft_model: PreTrainedModel | str | None = None,
        spec: SpecConfig | None = None,
        **options,
    ):
        """draft_model: a causal LM with the target's vocabulary, or "ngram" for prompt lookup."""
        self.config = EngineConfig(**options)
        self.spec = spec or SpecConfig()
        self.runner = ModelRunner(model, self.config)
        self.drafters = {}
        self.depth_policies: dict[tuple, DepthPolicy] = {}
        self.drafter = None if draft_model is None else self._make_drafter(draft_model)
        self.cache: PagedKVCache | None = None
        self.last_stats: DecodeStats | None = None

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config=None,
        logits_processor=None,
        stopping_criteria=None,
        prefix_allowed_tokens_fn=None,
        synced_gpus=None,
        assistant_model=None,
        streamer=None,
        negative_prompt_ids=None,
        negative_prompt_attention_mask=None,
        custom_generate=None,
        **kwargs,
    ):
        """Same arguments and results as `transformers.GenerationMixin.generate`; `generator=` seeds sampling."""
        generator = kwargs.pop("generator", None)
        extra = dict(
            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
            synced_gpus=synced_gpus,
            negative_prompt_ids=negative_prompt_ids,
            negative_prompt_attention_mask=negative_prompt_attention_mask,
            custom_generate=custom_generate,
            assistant_tokenizer=kwargs.pop("assistant_tokenizer", None),
        )
        model = self.runner.model
        request = build_request(model, inputs, generation_config, logits_processor, stopping_criteria, extra, kwargs)
        drafter = self._make_drafter(assistant_model) if assistant_model is not None else self.drafter
        self._check_request(request, streamer, generator, speculative=drafter is not None)
        cache = self._cache_for(request, speculative=drafter is not None)
        if drafter is None:
            scheduler = Scheduler(self.runner, cache, request, streamer, generator)
        else:
            scheduler = SpeculativeScheduler(self.runner, cache, request, drafter, self.spec, streamer, generator,
                                             self._depth_policy(drafter, request))
        try:
            return scheduler.run()
        finally:
            self.last_stats = scheduler.stats

    def _depth_policy(self, drafter, request: Request) -> DepthPolicy | None:
        """One policy per drafter, decoding mode and batch size (costs differ between them), kept across calls."""
        if not self.spec.adaptive:
            return None
        key = (id(drafter), request.params.mode, len(request.prompts))
        return self.depth_policies.setdefault(key, DepthPolicy(self.spec.depth))

    def _make_drafter(self, draft):
        """One drafter per draft model, kept with its cache across calls."""
        key = draft if isinstance(draft, str) else id(draft)
        if key not in self.drafters:
            vocab = self.runner.model.config.get_text_config().vocab_size
            if isinstance(draft, str):
                if draft != "ngram":
                    raise ValueError(f'draft_model must be a model or "ngram", got {draft!r}')
                self.drafters[key] = NgramDrafter(vocab)
            else:
                self.drafters[key] = DraftModelDrafter(draft, vocab, self.config)
        return self.drafters[key]

    def _check_request(self, request: Request, streamer, generator, speculative: bool) -> None:
        if streamer is not None and request.params.mode == BEAM:
            raise ValueError("streamer cannot be used with beam search (num_beams > 1), as in transformers")
        if streamer is not None and speculative and request.input_ids.shape[0] > 1:
            raise ValueError("streamer with speculative decoding needs one sequence: rows advance out of step")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        window = self.runner.sliding_window
        if window is not None and request.params.max_length > window:
            raise ValueError(
                f"max_length {request.params.max_length} exceeds the model's sliding_window {window}, "
                "which specbeam's attention does not implement"
            )

    def _blocks_needed(self, request: Request, speculative: bool) -> int:
        """Prompt blocks once, plus per row: a private copy of the prompt's partial block and the new tokens."""
        size = self.config.block_size
        new_tokens = request.params.max_length - request.input_ids.shape[1]
        prompt_blocks = sum(-(-len(p) // size) for p in request.prompts)
        if not speculative:
            return prompt_blocks + request.input_ids.shape[0] * (-(-new_tokens // size) + 1)
        # a tree's nodes sit past the committed tokens; beams fork trees and copy the blocks they keep
        tree = self.spec.for_beams(request.params.num_beams).max_nodes
        return prompt_blocks + 2 * request.input_ids.shape[0] * (-(-(new_tokens + tree) // size) + 2)

    def _cache_for(self, request: Request, speculative: bool) -> PagedKVCache:
        """The engine's pool, grown when this request needs more blocks than it has."""
        needed, size = self._blocks_needed(request, speculative), self.config.block_size
        limit = self.config.max_cache_bytes
        block_bytes = self.runner.bytes_per_token() * size
        if limit is not None and needed * block_bytes > limit:
            raise ValueError(
                f"this request needs {needed} KV blocks ({needed * block_bytes / 2**20:.1f} MiB) but "
                f"max_cache_bytes allows {limit / 2**20:.1f} MiB: shorten max_new_tokens, the batch or num_beams"
            )
        if self.cache is None or self.cache.allocator.num_blocks < needed:
            self.cache = None  # free the old pool before allocating the new one
            self.cache = self.runner.new_cache(needed, size)
        self.cache.allocator.peak_used = 0
        return self.cache


def patch(model: PreTrainedModel, **options) -> PreTrainedModel:
    """Make `model.generate` go through specbeam. Calls with an option specbeam does not support go to the
    original `generate`, with a warning naming the option once."""
    if hasattr(model, "_specbeam_engine"):
        return model
    engine, original, warned = Engine(model, **options), model.generate, set()

    def generate(*args, **kwargs):
        try:
            return engine.generate(*args, **kwargs)
        except UnsupportedOptionError as error:
            if error.option not in warned:
                warned.add(error.option)
                warnings.warn(f"specbeam: {error}; using transformers' generate for this call", stacklevel=2)
            return original(*args, **kwargs)

    model._specbeam_engine = engine
    model.generate = generate
    return model


def unpatch(model: PreTrainedModel) -> PreTrainedModel:
    """Undo `patch`: `model.generate` is transformers' again."""
    if hasattr(model, "_specbeam_engine"):
        del model._specbeam_engine
        del model.generate
    return model
