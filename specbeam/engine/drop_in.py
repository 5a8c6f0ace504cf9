"""`Engine.generate`: transformers' `model.generate`, same arguments and outputs, served by the step-based core
(`specbeam.engine.core`): calls from several threads on one engine are batched into the same forwards, stepped
by one of the waiting callers (`specbeam.engine.loop`), and each gets exactly what it would get alone.
`patch(model)` routes `model.generate` through an engine; `unpatch(model)` undoes it."""
import threading
import time
import warnings

import torch
from transformers import PreTrainedModel

from specbeam.config import EngineConfig, SpecConfig
from specbeam.engine.core import EngineCore
from specbeam.engine.loop import EngineLoop
from specbeam.engine.routing import CALIBRATION_TOKENS, Router
from specbeam.outputs import RequestOutput
from specbeam.router import RouterConfig
from specbeam.stats import DecodeStats
from specbeam.validation import UnsupportedOptionError


class Engine:
    """Decoding engine for one target model and optionally a draft. `options` fill an `EngineConfig`.

    `generate` is the drop-in; `add_request` / `step` / `abort` / `has_unfinished_requests` drive the core
    yourself, one request or many (do not mix them with concurrent `generate` calls on the same engine)."""

    def __init__(
        self,
        model: PreTrainedModel,
        draft_model: PreTrainedModel | list[PreTrainedModel] | str | None = None,
        spec: SpecConfig | None = None,
        router: RouterConfig | None = None,
        **options,
    ):
        """draft_model: a causal LM with the target's vocabulary, a list of them (a cascade, smallest first), or
        "ngram" for prompt lookup. router: the opt-in, lossy early exit (`specbeam.engine.routing`): a call may
        be answered by one of the drafts."""
        if router is not None and (draft_model is None or isinstance(draft_model, str)):
            raise ValueError(f"router needs draft models to stop at (draft_model=[...]), got {draft_model!r}")
        self.core = EngineCore(model, draft_model, spec, EngineConfig(**options))
        self.router = None
        if router is not None:  # it reads the stages through their runners: the drafts', then the target's
            self.router = Router(router, [stage.runner for stage in self.core.drafter.stages] + [self.core.runner])
        self.loop = EngineLoop(self.core)
        self.config, self.spec, self.runner = self.core.config, self.core.spec, self.core.runner
        self.cache, self.drafter, self.tree_policies = self.core.cache, self.core.drafter, self.core.tree_policies
        self.add_request, self.step, self.abort = self.core.add_request, self.core.step, self.core.abort
        self.has_unfinished_requests = self.core.has_unfinished_requests
        self._calls = threading.local()

    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, **kwargs):
        """Same arguments and results as `transformers.GenerationMixin.generate`; `generator=` seeds sampling."""
        state = self.core.prepare(inputs, generation_config, **kwargs)
        if self.router is None:
            return self._run(state)
        prompts = state.request.prompts
        new_tokens = state.params.max_length - max(len(p) for p in prompts)
        if not self.router.calibrated:
            self._calibrate(prompts[0], min(new_tokens, CALIBRATION_TOKENS))
        start = time.perf_counter()
        stage = self.router.route(prompts, state.params.max_length)
        if stage is None:
            result = self._run(state)
        else:  # a draft answers
            engine = self._stage_engine(stage)
            result = engine.generate(inputs, generation_config, **kwargs)
            self._calls.stats = engine.last_stats
            self._calls.stats.routed_to = stage
        self.router.record(stage, time.perf_counter() - start, new_tokens)
        return result

    def _stage_engine(self, stage: int) -> "Engine":
        """The engine that answers with draft `stage`, the drafts below it drafting for it."""
        return self.router.engine(stage, lambda target, drafts: Engine(target, drafts, self.spec))

    def _calibrate(self, prompt: torch.Tensor, new_tokens: int) -> None:  # prompt: [length]
        """Time every stage, the target included, on `new_tokens` greedy tokens after `prompt` (the first routed
        call's), after a first call that lets the stage's engine measure its own pass costs."""
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        for stage in [*range(len(self.router.models) - 1), None]:
            for _ in range(2):
                start = time.perf_counter()
                if stage is None:
                    self._run(self.core.prepare(prompt[None], **kwargs))
                else:
                    self._stage_engine(stage).generate(prompt[None], **kwargs)
            self.router.record(stage, time.perf_counter() - start, new_tokens)

    def _run(self, state):
        """Serve a prepared call on this engine's loop and wait for its result."""
        finished, box = threading.Event(), []

        def on_output(output: RequestOutput) -> None:
            if output.finished:
                box.append(output)
                finished.set()

        request_id = self.loop.submit_state(state, on_output, waits=True)
        try:
            self.loop.wait(finished)
        except BaseException:  # KeyboardInterrupt: the request stops, its blocks are freed
            if not finished.is_set():
                self.loop.abort(request_id)
                self.loop.wait(finished)
            raise
        self._calls.stats = state.stats
        output = box[0]
        if output.error is not None:
            raise output.error
        return output.result

    @property
    def last_stats(self) -> DecodeStats | None:
        """The stats of the calling thread's last `generate` call."""
        return getattr(self._calls, "stats", None)


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
