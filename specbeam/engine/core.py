"""The engine core: many requests, one loop, every mode in the same target forward.

    add_request(input_ids, generation_config=None, **generate_kwargs) -> request_id
    step() -> list[RequestOutput]      schedule -> prefill -> propose -> ONE target forward -> select -> commit
    abort(request_id)

A step admits waiting requests while KV blocks allow (preempting the youngest when the running ones outgrow the
pool), prefills what was admitted, lets every running request plan its round (its rows' draft trees; a tree of
the root alone is a plain step), runs one target forward over all of them, and hands each request its logits to
select and commit. Finished requests free their blocks at once. `add_request` and `abort` may be called from any
thread; `step` from one at a time."""
import gc
import itertools
import threading
import time
from collections import defaultdict

import torch
from transformers import PreTrainedModel

from specbeam import ops
from specbeam.cache import BlockTable, PagedKVCache
from specbeam.cascade import CascadeDrafter
from specbeam.config import BEAM, SAMPLE, EngineConfig, SpecConfig
from specbeam.drafters import DraftModelDrafter, NgramDrafter
from specbeam.engine.beams import BeamDecoding, absorb_beams
from specbeam.engine.decoding import Decoding
from specbeam.engine.scheduler import Scheduler
from specbeam.engine.tokens import TokenDecoding, absorb_tokens
from specbeam.model_runner import ModelRunner, Work
from specbeam.outputs import RequestOutput
from specbeam.request import build_request
from specbeam.stats import DecodeStats
from specbeam.tree_policy import (BEAMS, CALIBRATION_TOKENS, GREEDY, SAMPLING, Acceptance, PassCost, StagesPolicy,
                                  SummedPassCost, TreePolicy, TreeShape)
from specbeam.validation import check_finite

DEFAULT_CPU_CACHE_BYTES = 256 * 2**20  # the target's KV pool on the CPU (paged in only as it is used)
DEVICE_CACHE_SHARE = 0.5  # of the device's free memory, on a GPU


class EngineCore:
    def __init__(self, model: PreTrainedModel, draft_model=None, spec: SpecConfig | None = None,
                 config: EngineConfig | None = None):
        """draft_model: a causal LM with the target's vocabulary, or "ngram" for prompt lookup."""
        self.config, self.spec = config or EngineConfig(), spec or SpecConfig()
        self.runner = ModelRunner(model, self.config)
        self.cache = self.runner.new_cache(self._pool_blocks(), self.config.block_size)
        self.scheduler = Scheduler(self.cache, self.config.max_num_seqs)
        self.drafters: dict = {}
        self.target_cost = PassCost()  # seconds of a round by the tokens it feeds the target
        self.tree_policies: dict[tuple, TreePolicy] = {}  # per (drafter, mode, beams)
        self.calibrated = True  # every drafter's pass costs, and the target's, are measured (a new drafter: not yet)
        self.drafter = None if draft_model is None else self.make_drafter(draft_model)
        self.requests: dict[str, Decoding] = {}
        self.lock = threading.Lock()  # guards the queue and the request table against other threads
        self.aborted: list[str] = []
        self.ids = itertools.count()
        self.totals = DecodeStats()  # over the engine's life: drafted and accepted tokens of finished requests

    # --- requests -----------------------------------------------------------------------------------------

    def add_request(self, input_ids=None, generation_config=None, request_id: str | None = None, **kwargs) -> str:
        """Validate a `generate` call (ValueError / TypeError before any work) and queue it."""
        return self.add(self.prepare(input_ids, generation_config, **kwargs), request_id)

    def prepare(self, *args, **kwargs) -> Decoding:
        """The decoding state of one `generate` call, validated; nothing runs yet. Its tensors are ordinary ones
        even when the caller is in inference mode: the engine's thread updates them in place. Off the main thread
        its torch operations run serially: a caller's thread that opened an OpenMP team of its own would leave it
        spinning on the cores the engine steps on (`specbeam.engine.loop`; 8 callers' threads made each step of
        theirs 1.6x slower)."""
        ops.serial_torch_ops(True)
        try:
            with torch.inference_mode(False), torch.no_grad():
                return self._prepare(*args, **kwargs)
        finally:
            ops.serial_torch_ops(False)

    def _prepare(self, inputs=None, generation_config=None, logits_processor=None, stopping_criteria=None,
                 prefix_allowed_tokens_fn=None, synced_gpus=None, assistant_model=None, streamer=None,
                 negative_prompt_ids=None, negative_prompt_attention_mask=None, custom_generate=None,
                 **kwargs) -> Decoding:
        generator = kwargs.pop("generator", None)
        extra = dict(
            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn, synced_gpus=synced_gpus,
            negative_prompt_ids=negative_prompt_ids, negative_prompt_attention_mask=negative_prompt_attention_mask,
            custom_generate=custom_generate, assistant_tokenizer=kwargs.pop("assistant_tokenizer", None),
        )
        request = build_request(self.runner.model, inputs, generation_config, logits_processor, stopping_criteria,
                                extra, kwargs)
        drafter = self.make_drafter(assistant_model) if assistant_model is not None else self.drafter
        self._check(request, streamer, generator)
        spec = self.spec.for_beams(request.params.num_beams) if request.params.mode == BEAM else self.spec
        kind = BeamDecoding if request.params.mode == BEAM else TokenDecoding
        # a seeded request's draws depend on its trees' shapes: it drafts the fixed tree, whatever runs beside it
        policy = None if generator is not None else self._tree_policy(drafter, request, spec)
        if generator is None and request.params.mode == SAMPLE:
            generator = _fresh_generator(self.runner.device)
        state = kind(request, self.cache, drafter, spec, policy, streamer, generator)
        self._check_fits(state)
        return state

    def add(self, state: Decoding, request_id: str | None = None) -> str:
        with self.lock:
            request_id = request_id if request_id is not None else f"req-{next(self.ids)}"
            if request_id in self.requests:
                raise ValueError(f"request_id {request_id!r} is already in use")
            state.request_id = request_id
            self.requests[request_id] = state
            self.scheduler.waiting.append(state)
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks are freed at the next step, which reports it finished and aborted."""
        with self.lock:
            self.aborted.append(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def metrics(self) -> dict:
        """Gauges of the engine now."""
        allocator = self.cache.allocator
        return dict(kv_blocks_total=allocator.num_blocks, kv_blocks_used=allocator.num_used,
                    requests_waiting=len(self.scheduler.waiting), requests_running=len(self.scheduler.running),
                    preemptions=self.scheduler.preemptions, accepted_by_depth=list(self.totals.accepted_by_depth),
                    drafted_tokens=self.totals.drafted_tokens)

    # --- one step -----------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """For the length of a step, every object Python's collector tracked before it is frozen (`gc.freeze`, as
        vLLM's engine core does): torch's, transformers' and the models' ~400K objects, which a full collection
        would scan, pausing the engine ~0.2 s now and then (one in three of a 0.3 s call's timings). The objects a
        step makes are collected as usual; when it ends, the frozen ones go back (`gc.unfreeze`). Both are O(1)."""
        gc.freeze()
        try:
            return self._step()
        finally:
            gc.unfreeze()

    @torch.no_grad()
    def _step(self) -> list[RequestOutput]:
        outputs = self._take_aborted()
        if self.tree_policies and not self.calibrated:
            self.calibrated = self._calibrate()
        with self.lock:
            failures = self.scheduler.schedule()
            running = list(self.scheduler.running)
        outputs += [self._fail(state, error) for state, error in failures]
        if not running:
            return outputs
        self.cache.allocator.peak_used = self.cache.allocator.num_used
        if all(s.needs_prefill for s in running):  # nothing else runs: the prompts first, then their first round
            while prefilling := [s for s in running if s.needs_prefill and s.request_id in self.requests]:
                self._round([], outputs, {s: s.prefill_works() for s in prefilling})
            running = [s for s in running if s.request_id in self.requests]
        riding = {s: s.prefill_works() for s in running if s.needs_prefill}
        start = time.perf_counter()  # the tree policies weigh rounds, not prefills of their own
        running = self._round([s for s in running if not s.needs_prefill], outputs, riding)
        seconds = time.perf_counter() - start
        riding_tokens = sum(len(w.tokens) for works in riding.values() for w in works)  # their share of the forward
        total = sum(state.round_tokens for state in running) + riding_tokens or 1
        peak = self.cache.allocator.peak_used
        for state in running:
            # a request's share of the round's time is its share of the forward's tokens: deeper trees beside
            # others cost what they add, not nothing
            state.report_round(seconds * state.round_tokens / total)
            state.stats.kv_blocks_peak = max(state.stats.kv_blocks_peak, peak)  # the pool's, while it ran
            state.stats.kv_bytes_peak = state.stats.kv_blocks_peak * self.cache.block_bytes
            outputs.append(self._output(state))
        return outputs

    def _round(self, running: list[Decoding], outputs: list, riding: dict[Decoding, list[Work]]) -> list[Decoding]:
        """Every request's round in one target forward, which also stores the K/V of the `riding` requests'
        prompts (their prefill works, which score nothing), and of preempted ones' tokens past them: those just
        admitted beside running ones, whose first round is the next step's (one forward a step, however requests
        arrive), or, with none running, the prompts alone."""
        works = [w for mine in riding.values() for w in mine]
        planned = []
        for state, mine in self._plan(running, outputs):
            planned.append((state, len(works), len(mine)))
            state.round_tokens = sum(len(w.tokens) for w in mine)
            works += mine
        # timed only for the tree policies, and only as a round: prompts riding along are not a tree's tokens
        cost = self.target_cost if self.tree_policies and not riding else None
        logits = self._forward(works, [s for s, _, _ in planned] + list(riding), outputs, cost) if works else None
        if works and logits is None:  # the forward failed, and so did every request in it
            return []
        for state, mine in riding.items():
            state.stats.target_passes += bool(mine)
            state.after_prefill()
        if not planned:
            return []
        bounds = [0, *itertools.accumulate(w.num_logits for w in works)]  # per work: its first row of logits
        # a nan or inf anywhere makes the sum one (20x cheaper than isfinite over all of them); then each request
        # checks its own rows, which also clears a sum of finite logits that overflowed
        finite = bool(torch.isfinite(logits.sum()))
        spans = {}  # per request whose logits are fine: its rows of them
        for state, first, count in planned:
            state.stats.target_passes += 1
            spans[state] = bounds[first], bounds[first + count]
            try:
                if not finite:
                    check_finite(logits[slice(*spans[state])], state.stats.steps)
            except FloatingPointError as error:
                del spans[state]
                outputs.append(self._fail(state, error))
        tokens = [s for s in spans if isinstance(s, TokenDecoding)]
        failures = absorb_tokens(tokens, [logits[slice(*spans[s])] for s in tokens])
        outputs += [self._fail(state, error) for state, error in failures]
        for members in _joined_beams([s for s in spans if isinstance(s, BeamDecoding)]):
            try:
                absorb_beams(members, logits, [spans[m][0] for m in members])
            except Exception as error:  # noqa: BLE001: a request's own failure (a processor, a criterion)
                outputs += [self._fail(state, error) for state in members]
        return [s for s, _, _ in planned if s.request_id in self.requests]

    def _plan(self, running: list[Decoding], outputs: list) -> list[tuple[Decoding, list[Work]]]:
        """Every request's works for this round. Their plans run side by side: the draft passes they ask for
        at each depth go through one forward per draft model."""
        plans, waiting = {}, {}
        for state in running:
            self._advance(state, state.plan(), None, waiting, plans, outputs)
        while waiting:
            by_drafter = defaultdict(list)
            for state, (plan, draft_pass) in waiting.items():
                by_drafter[id(draft_pass.drafter)].append((state, plan, draft_pass))
            waiting = {}
            for items in by_drafter.values():
                drafter = items[0][2].drafter
                works = [w for _, _, draft_pass in items for w in draft_pass.works]
                try:
                    logits = _timed_forward(drafter.runner, drafter.cache, works, drafter.pass_cost)
                except Exception as error:  # noqa: BLE001: the draft's forward fails every request in it
                    outputs += [self._fail(state, error) for state, _, _ in items]
                    continue
                for (state, plan, _), part in zip(items, logits.split([p.num_logits for _, _, p in items])):
                    self._advance(state, plan, part, waiting, plans, outputs)
        return [(s, plans[s]) for s in running if s in plans]

    def _advance(self, state: Decoding, plan, value, waiting: dict, plans: dict, outputs: list) -> None:
        """Send a plan what it waited for: it asks for its next draft pass, or returns its works."""
        try:
            waiting[state] = (plan, plan.send(value))
        except StopIteration as done:
            plans[state] = done.value
        except Exception as error:  # noqa: BLE001: a request's own failure (a processor, the draft's sampling)
            outputs.append(self._fail(state, error))

    def _forward(self, works: list[Work], states: list[Decoding], outputs: list,
                 cost: PassCost | None = None) -> torch.Tensor | None:
        """The target forward (timed into `cost`, if given); if it fails, so does every request in it."""
        try:
            return _timed_forward(self.runner, self.cache, works, cost)
        except Exception as error:  # noqa: BLE001
            self.cache.pending = []  # copies on write for blocks the failed requests give back
            outputs += [self._fail(state, error) for state in states]
            return None

    def _output(self, state: Decoding) -> RequestOutput:
        new_tokens, new_logits = state.take_new_tokens()
        if not state.finished:
            return RequestOutput(state.request_id, new_tokens, new_logits)
        try:
            result = state.result()
        except Exception as error:  # noqa: BLE001
            return self._fail(state, error)
        self._retire(state)
        return RequestOutput(state.request_id, new_tokens, new_logits, finished=True, result=result)

    def fail_all(self, error: Exception) -> list[RequestOutput]:
        """Fail every request (the engine's own step broke): each caller hears why, and the pools are free."""
        self.cache.pending = []
        return [self._fail(state, error) for state in list(self.requests.values())]

    def _fail(self, state: Decoding, error: Exception) -> RequestOutput:
        if isinstance(error, FloatingPointError):
            self.cache.zero(state.tables())  # the model wrote non-finite K/V: keep them from any later request
        self._retire(state)
        return RequestOutput(state.request_id, [], finished=True, error=error)

    def _retire(self, state: Decoding) -> None:
        state.release()
        if state.streamer is not None:
            state.streamer.end()
        self.totals.add(state.stats)
        with self.lock:
            self.scheduler.remove(state)
            self.requests.pop(state.request_id, None)

    def _take_aborted(self) -> list[RequestOutput]:
        with self.lock:
            aborted, self.aborted = self.aborted, []
        outputs = []
        for request_id in aborted:
            state = self.requests.get(request_id)
            if state is not None:
                self._retire(state)
                outputs.append(RequestOutput(request_id, [], finished=True, aborted=True))
        return outputs

    # --- set-up -------------------------------------------------------------------------------------------

    def make_drafter(self, draft):
        """One drafter per draft model (a list of models: a cascade), kept with its caches across requests."""
        cascade = isinstance(draft, (list, tuple))
        key = tuple(map(id, draft)) if cascade else draft if isinstance(draft, str) else id(draft)
        if key not in self.drafters:
            self.drafters[key] = self._new_drafter(draft)
            self.calibrated = False
        return self.drafters[key]

    def _new_drafter(self, draft):
        vocab = self.runner.model.config.get_text_config().vocab_size
        if isinstance(draft, str):
            if draft != "ngram":
                raise ValueError(f'draft_model must be a model, a list of models or "ngram", got {draft!r}')
            return NgramDrafter(vocab)
        if isinstance(draft, (list, tuple)):
            if not draft or not all(isinstance(m, PreTrainedModel) for m in draft):
                raise ValueError(f"draft_model as a cascade must be a non-empty list of models, smallest first, "
                                 f"got {draft!r}")
            stages = [self._new_drafter(model) for model in draft]
            return stages[0] if len(stages) == 1 else CascadeDrafter(stages)
        return DraftModelDrafter(draft, vocab, self.config, 2 * self.cache.allocator.num_blocks,
                                 max_bytes=self._draft_bytes(), weights=self.spec.draft_weights)

    def _tree_policy(self, drafter, request, spec: SpecConfig) -> TreePolicy | StagesPolicy | None:
        """The policy sizing the trees of requests of this drafter and mode, kept across requests (None: the
        fixed tree of `spec`). The widths it chooses from: 1 .. spec.width (an n-gram draft proposes one chain;
        beam search drafts `spec.width` nodes per prompt and depth). A cascade's also chooses its stages."""
        if drafter is None or not self.spec.adaptive:
            return None
        mode, beams = request.params.mode, request.params.num_beams
        key = (id(drafter), mode, beams)
        if key not in self.tree_policies:
            if isinstance(drafter, CascadeDrafter):
                subsets = [s for n in range(1, len(drafter.stages) + 1)
                           for s in itertools.combinations(range(len(drafter.stages)), n)]
                self.tree_policies[key] = StagesPolicy({s: self._new_tree_policy(
                    drafter, SummedPassCost([drafter.stages[i].pass_cost for i in s]), mode, beams, spec)
                    for s in subsets})
            else:
                self.tree_policies[key] = self._new_tree_policy(drafter, drafter.pass_cost, mode, beams, spec)
        return self.tree_policies[key]

    def _new_tree_policy(self, drafter, draft_cost, mode: str, beams: int, spec: SpecConfig) -> TreePolicy:
        kind = BEAMS if mode == BEAM else SAMPLING if mode == SAMPLE else GREEDY
        ngram = isinstance(drafter, NgramDrafter)
        widths = (1,) if ngram else (spec.width,) if kind == BEAMS else tuple(range(1, spec.width + 1))
        shape = TreeShape(kind, 1 if ngram else spec.branch, beams)
        acceptance = Acceptance(spec.depth, 1 if kind == BEAMS else widths[-1])
        return TreePolicy(shape, acceptance, self.target_cost, draft_cost, widths)

    def _calibrate(self) -> bool:
        """Measure the target's and each draft's pass costs at first use, on scratch K/V freed at once (a step
        that finds too few free blocks leaves it to a later one). Returns whether all are measured."""
        pools = [(self.runner, self.cache, self.target_cost)] + [
            (s.runner, s.cache, s.pass_cost) for d in self.drafters.values() for s in d.stages]
        for runner, cache, cost in pools:
            if not cost.known and cache.allocator.num_free * cache.block_size >= max(CALIBRATION_TOKENS):
                cost.calibrate(lambda n: _scratch_forward(runner, cache, n))
        return all(cost.known for _, _, cost in pools)

    def _draft_bytes(self) -> int | None:
        """On a GPU, the draft's pool gets at most half of what is free once the target's is made."""
        if self.runner.device.type != "cuda":
            return None
        return int(DEVICE_CACHE_SHARE * _device_free(self.runner.device))

    def _pool_blocks(self) -> int:
        budget = self.config.max_cache_bytes
        if budget is None:
            device = self.runner.device
            budget = int(DEVICE_CACHE_SHARE * _device_free(device)) if device.type == "cuda" else DEFAULT_CPU_CACHE_BYTES
        return budget // (self.runner.bytes_per_token() * self.config.block_size)

    def _check(self, request, streamer, generator) -> None:
        if streamer is not None and request.params.mode == BEAM:
            raise ValueError("streamer cannot be used with beam search (num_beams > 1), as in transformers")
        if streamer is not None and request.input_ids.shape[0] > 1:
            raise ValueError("streamer needs one sequence (batch 1, one return sequence), as transformers' streamers")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        window = self.runner.sliding_window
        if window is not None and request.params.max_length > window:
            raise ValueError(
                f"max_length {request.params.max_length} exceeds the model's sliding_window {window}, "
                "which specbeam's attention does not implement"
            )

    def _check_fits(self, state: Decoding) -> None:
        """A prompt that cannot fit in the whole pool is refused before any work (a plain first step: a round
        that drafts can always wait for a plain one)."""
        needed = state.prefill_blocks() + state.blocks_needed()[0]
        total = self.cache.allocator.num_blocks
        if needed > total:
            raise ValueError(
                f"the prompt ({state.request.input_ids.shape[1]} tokens x {state.request.input_ids.shape[0]} rows) "
                f"needs {needed} KV blocks but the pool holds {total} (max_cache_bytes="
                f"{self.config.max_cache_bytes or total * self.cache.block_bytes}): shorten the prompt or the "
                "batch, or raise max_cache_bytes"
            )


def _joined_beams(states: list[BeamDecoding]) -> list[list[BeamDecoding]]:
    """Beam requests grouped by the search they replay in: those of one kind together (`BeamDecoding.kind`), in
    the order their kinds first come; a request of no kind alone."""
    groups = defaultdict(list)
    for state in states:
        groups[state.kind if state.kind is not None else state].append(state)
    return list(groups.values())


def _device_free(device: torch.device) -> int:
    """Bytes a new pool can take on a GPU: what the driver has free and what torch's allocator holds unused."""
    return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _timed_forward(runner: ModelRunner, cache: PagedKVCache, works: list[Work], cost: PassCost | None) -> torch.Tensor:
    """runner.forward; with `cost`, its seconds (once the device is done) go to that pass-cost curve."""
    if cost is None:
        return runner.forward(cache, works)
    start = time.perf_counter()
    logits = runner.forward(cache, works)
    if logits.is_cuda:
        torch.cuda.synchronize(logits.device)
    cost.record(sum(len(w.tokens) for w in works), time.perf_counter() - start)
    return logits


def _scratch_forward(runner: ModelRunner, cache: PagedKVCache, tokens: int) -> None:
    """A forward of `tokens` new tokens, all scored, whose K/V are dropped; it returns once they are computed."""
    table = BlockTable()
    try:
        runner.forward(cache, [Work(table, [0] * tokens, tokens)])[-1, 0].item()
    finally:
        cache.release(table)


def _fresh_generator(device: torch.device) -> torch.Generator:
    """A request's own random stream on the model's device, seeded from torch's global one (so
    `torch.manual_seed` still seeds it)."""
    return torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,))))
