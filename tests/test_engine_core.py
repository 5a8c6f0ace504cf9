"""The step-based core: requests of every mode share the target's forwards and each gets exactly what it would
get alone, whether added while others run, next to an aborted one, preempted for lack of KV blocks, or sent
from several threads at once. No block leaks after any of it."""
import copy
import functools
import threading

import pytest
import torch

from transformers.generation.streamers import BaseStreamer

from specbeam import Engine, SpecConfig
from tiny_models import PAD, left_padded_batch, tiny_model

EOS = 52  # a token the llama target emits early in some rows


@functools.cache
def perturbed_draft():
    draft = copy.deepcopy(tiny_model("llama"))
    torch.manual_seed(9)
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    return draft


def _calls() -> list[dict]:
    """Mixed modes and prompt batches (each with its own seeded generator where it samples)."""
    ids, mask = left_padded_batch((7, 3, 5), seed=0)
    common = dict(pad_token_id=PAD, eos_token_id=EOS, return_dict_in_generate=True)
    return [
        dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, **common),
        dict(input_ids=ids[:1], max_new_tokens=9, num_beams=3, **common),
        dict(input_ids=ids[1:], attention_mask=mask[1:], max_new_tokens=10, repetition_penalty=1.3, **common),
        dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, num_beams=2, num_return_sequences=2, **common),
        dict(input_ids=ids[2:], attention_mask=mask[2:], max_new_tokens=11, do_sample=True, top_k=5,
             num_return_sequences=2, generator=torch.Generator().manual_seed(3), **common),
        dict(input_ids=ids[:2], attention_mask=mask[:2], max_new_tokens=6, num_beams=4, length_penalty=0.0,
             **common),
    ]


def _fresh(call: dict) -> dict:
    """The same call with its generator reset to the seed it started from."""
    call = dict(call)
    if "generator" in call:
        call["generator"] = torch.Generator().manual_seed(3)
    return call


def _same(a, b) -> bool:
    same = torch.equal(a.sequences, b.sequences)
    if getattr(a, "beam_indices", None) is not None:
        same &= torch.equal(a.beam_indices, b.beam_indices)
    return same


def _solo(engine: Engine) -> list:
    return [engine.generate(**_fresh(c)) for c in _calls()]


def _assert_no_leak(engine: Engine) -> None:
    assert engine.cache.allocator.num_used == 0
    if engine.drafter is not None and hasattr(engine.drafter, "cache"):
        assert engine.drafter.cache.allocator.num_used == 0


@pytest.mark.parametrize("draft", [None, "perturbed", "ngram"])
def test_requests_added_while_others_run_each_get_their_solo_output(draft):
    engine = Engine(tiny_model("llama"), draft_model=perturbed_draft() if draft == "perturbed" else draft,
                    spec=SpecConfig(depth=2, adaptive=False))
    solo, calls = _solo(engine), _calls()
    ids, results, steps = {}, {}, 0
    while len(ids) < len(calls) or engine.has_unfinished_requests():
        if steps % 2 == 0 and len(ids) < len(calls):  # one more request every other step
            ids[engine.add_request(**_fresh(calls[len(ids)]))] = len(ids)
        for out in engine.step():
            if out.finished:
                assert out.error is None
                results[ids[out.request_id]] = out.result
        steps += 1
    assert all(_same(results[i], solo[i]) for i in range(len(calls)))
    _assert_no_leak(engine)


def test_a_prompt_admitted_beside_running_requests_rides_in_their_forward(monkeypatch):
    """One target forward a step, however requests arrive: a request admitted while others run has its prompt
    stored in their round's forward (it scores nothing there; its first round is the next step's), and each
    request still gets its solo output."""
    engine = Engine(tiny_model("llama"))
    calls = _calls()[:3]
    solo = [engine.generate(**_fresh(c)) for c in calls]
    forwards, forward = [], engine.runner.forward
    monkeypatch.setattr(engine.runner, "forward", lambda cache, works: forwards.append(works) or forward(cache, works))
    ids, results = {engine.add_request(**_fresh(calls[0])): 0}, {}
    engine.step()  # the first request alone: its prompt, then its first round
    assert [all(w.num_logits == 0 for w in works) for works in forwards] == [True, False]
    for i, call in enumerate(calls[1:], start=1):
        ids[engine.add_request(**_fresh(call))] = i
        forwards.clear()
        outputs = engine.step()
        assert len(forwards) == 1 and sum(w.num_logits == 0 for w in forwards[0]) > 0  # the prompt rode along
        assert all(out.request_id in ids for out in outputs) and list(ids)[i] not in [o.request_id for o in outputs]
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[ids[out.request_id]] = out.result
    assert all(_same(results[i], solo[i]) for i in range(len(calls)))
    _assert_no_leak(engine)


def test_step_outputs_stream_each_rows_new_tokens():
    engine = Engine(tiny_model("llama"))
    ids, mask = left_padded_batch((7, 3), seed=0)
    request = engine.add_request(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=PAD)
    streamed, result = [[], []], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == request
            for row, tokens in enumerate(out.new_token_ids):
                streamed[row] += tokens
            result = out.result if out.finished else result
    assert [result[r, ids.shape[1]:].tolist() for r in range(2)] == streamed


def test_an_abort_mid_run_frees_its_blocks_and_changes_no_other_output():
    engine = Engine(tiny_model("llama"), draft_model=perturbed_draft(), spec=SpecConfig(depth=2, adaptive=False))
    solo, calls = _solo(engine), _calls()
    ids = [engine.add_request(**_fresh(c)) for c in calls]
    results, aborted = {}, []
    for _ in range(3):
        engine.step()
    engine.abort(ids[1])
    engine.abort(ids[3])
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.aborted:
                aborted.append(out.request_id)
            elif out.finished:
                results[out.request_id] = out.result
    assert sorted(aborted) == sorted([ids[1], ids[3]])
    assert all(_same(results[ids[i]], solo[i]) for i in (0, 2, 4, 5))
    _assert_no_leak(engine)


def _long_calls() -> list[dict]:
    """Requests that grow well past their first blocks (no eos)."""
    ids, mask = left_padded_batch((7, 3, 5), seed=1)
    common = dict(pad_token_id=PAD, return_dict_in_generate=True)
    return [dict(input_ids=ids, attention_mask=mask, max_new_tokens=50, **common),
            dict(input_ids=ids[:1], max_new_tokens=40, num_beams=2, **common),
            dict(input_ids=ids[1:], attention_mask=mask[1:], max_new_tokens=45, do_sample=True,
                 generator=torch.Generator().manual_seed(3), **common),
            dict(input_ids=ids[2:], attention_mask=mask[2:], max_new_tokens=50, repetition_penalty=1.3, **common)]


@pytest.mark.parametrize("draft", [None, "perturbed"])
def test_preemption_recomputes_and_changes_no_output(draft):
    """A pool too small for every request at once: the youngest are preempted and recomputed later."""
    model = tiny_model("llama")
    block_bytes = 16 * Engine(model).runner.bytes_per_token()
    engine = Engine(model, draft_model=perturbed_draft() if draft else None,
                    spec=SpecConfig(depth=2, adaptive=False), max_cache_bytes=16 * block_bytes)
    solo = [engine.generate(**_fresh(c)) for c in _long_calls()]
    ids = [engine.add_request(**_fresh(c)) for c in _long_calls()]
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.error is None
                results[out.request_id] = out.result
    assert engine.core.metrics()["preemptions"] > 0
    assert all(_same(results[i], s) for i, s in zip(ids, solo))
    _assert_no_leak(engine)


def test_eight_threads_on_one_engine_each_get_their_solo_output():
    engine = Engine(tiny_model("llama"), draft_model=perturbed_draft())
    calls = _calls() + _calls()[:2]
    solo = [engine.generate(**_fresh(c)) for c in calls]
    results, errors = [None] * len(calls), []

    def run(i: int) -> None:
        try:
            results[i] = engine.generate(**_fresh(calls[i]))
        except Exception as error:  # noqa: BLE001: reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(_same(r, s) for r, s in zip(results, solo))
    _assert_no_leak(engine)


# --- KV blocks on demand --------------------------------------------------------------------------------------


@pytest.mark.parametrize("draft", [None, "perturbed"])
def test_beam_requests_of_other_widths_and_limits_replay_as_one_search(draft, monkeypatch):
    """Beam requests of one kind whose prompts differ in width, length limit, count and returned sequences step as
    one search (each a member of one replay) and each gets its solo output, output_scores and eos included."""
    import specbeam.engine.beams as beams
    engine = Engine(tiny_model("llama"), draft_model=perturbed_draft() if draft else None,
                    spec=SpecConfig(depth=2, adaptive=False))
    common = dict(num_beams=3, pad_token_id=PAD, eos_token_id=EOS, return_dict_in_generate=True, output_scores=True)
    calls = []
    for width, count, new, returned in ((7, 1, 9, 1), (4, 2, 14, 2), (9, 3, 5, 1), (5, 1, 11, 3)):
        ids, mask = left_padded_batch(tuple(width - k for k in range(count)), seed=width)
        calls.append(dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, num_return_sequences=returned,
                          **common))
    solo = [engine.generate(**c) for c in calls]
    members = []
    replay = beams.BeamReplay
    monkeypatch.setattr(beams, "BeamReplay", lambda m, *a: members.append(len(m)) or replay(m, *a))
    ids = [engine.add_request(**c) for c in calls]
    results = {}
    while engine.has_unfinished_requests():
        results.update((o.request_id, o.result) for o in engine.step() if o.finished)
    assert max(members) == len(calls)  # every request in one replay
    for i, alone in zip(ids, solo):
        assert _same(results[i], alone) and torch.equal(results[i].sequences_scores, alone.sequences_scores)
        assert all(torch.equal(a, b) for a, b in zip(results[i].scores, alone.scores))
    _assert_no_leak(engine)


def test_a_requests_part_of_a_joined_search_is_split_off_as_it_was_and_never_after_it_steps():
    """A request's part of a joined beam search (`SplitLater`) reads as the split of the search as it was, under the
    request's own prompt ids; once the search has stepped, reading it is a bug and raises."""
    from transformers import GenerationConfig

    from specbeam.beam import BeamSearch
    from specbeam.config import SamplingParams
    from specbeam.engine.beam_replay import SplitLater
    from specbeam.stopping import StopCheck

    config = GenerationConfig(num_beams=2, max_length=12, pad_token_id=PAD, length_penalty=1.0, early_stopping=False,
                              num_return_sequences=1)
    config._pad_token_tensor = torch.tensor(PAD)
    params = SamplingParams.from_generation_config(config)
    group = BeamSearch(torch.arange(2, 14).view(6, 2), params, None)  # 3 prompts of 2 beams
    part = SplitLater(group, [1, 2], [0, 1], params)
    expected = group.split([1, 2])
    whole = part.whole()
    assert whole.prompts == [0, 1] and part.batch == 2
    assert all(torch.equal(getattr(whole, n), getattr(expected, n)) for n in ("running", "running_scores"))
    group.step(torch.log_softmax(torch.randn(6, 32), dim=-1), StopCheck([]), lambda prompts: None)
    with pytest.raises(RuntimeError, match="stepped"):
        part.whole()


@pytest.mark.parametrize("draft", [None, "perturbed"])
def test_requests_with_equal_repetition_penalties_are_processed_together(draft, monkeypatch):
    """Greedy and sampling requests whose processors are the same repetition penalty alone are processed in one
    call, each node with its own prefix; each request gets its solo output (a seeded sampling one included)."""
    import specbeam.engine.tokens as tokens
    engine = Engine(tiny_model("llama"), draft_model=perturbed_draft() if draft else None,
                    spec=SpecConfig(depth=2, adaptive=False))
    ids, mask = left_padded_batch((7, 3, 5), seed=4)
    common = dict(pad_token_id=PAD, eos_token_id=EOS, return_dict_in_generate=True, output_scores=True)
    calls = [dict(input_ids=ids, attention_mask=mask, max_new_tokens=9, repetition_penalty=1.3, **common),
             dict(input_ids=ids[1:], attention_mask=mask[1:], max_new_tokens=12, repetition_penalty=1.3, **common),
             dict(input_ids=ids[:1], max_new_tokens=7, repetition_penalty=1.3, do_sample=True, top_k=5,
                  generator=torch.Generator().manual_seed(3), **common),
             dict(input_ids=ids[2:], attention_mask=mask[2:], max_new_tokens=8, repetition_penalty=0.7, **common)]
    solo = [engine.generate(**_fresh(c)) for c in calls]
    together = []
    joint = tokens._penalized_together
    monkeypatch.setattr(tokens, "_penalized_together", lambda group, raw: together.append(len(group)) or
                        joint(group, raw))
    ids = [engine.add_request(**_fresh(c)) for c in calls]
    results = {}
    while engine.has_unfinished_requests():
        results.update((o.request_id, o.result) for o in engine.step() if o.finished)
    assert max(together) == 3  # the three requests of penalty 1.3 in one call
    for i, alone in zip(ids, solo):
        assert torch.equal(results[i].sequences, alone.sequences)
        assert all(torch.equal(a, b) for a, b in zip(results[i].scores, alone.scores))
    _assert_no_leak(engine)


def _eos_after_a_few(model, ids, mask) -> list[int]:
    """An eos list under which transformers' greedy rows all stop within a few tokens."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD)
    return sorted({int(t) for t in out[:, -1]})


@pytest.mark.parametrize("draft", [None, "perturbed"])
@pytest.mark.parametrize("mode", [dict(), dict(num_beams=3)], ids=["greedy", "beam3"])
def test_a_huge_max_new_tokens_is_a_limit_not_an_allocation(draft, mode):
    model = tiny_model("llama")
    ids, mask = left_padded_batch((7, 3, 5), seed=0)
    eos = _eos_after_a_few(model, ids, mask)
    kwargs = dict(attention_mask=mask, pad_token_id=PAD, eos_token_id=eos, **mode)
    reference = model.generate(ids, max_new_tokens=64, **kwargs)
    engine = Engine(model, draft_model=perturbed_draft() if draft else None)
    ours = engine.generate(ids, max_new_tokens=10**9, **kwargs)
    assert reference.shape[1] < ids.shape[1] + 64 and torch.equal(ours, reference)
    _assert_no_leak(engine)


def test_a_prompt_larger_than_the_pool_is_refused_before_any_work():
    model = tiny_model("llama")
    engine = Engine(model, max_cache_bytes=4 * 16 * Engine(model).runner.bytes_per_token())
    with pytest.raises(ValueError, match="prompt.*max_cache_bytes"):
        engine.generate(torch.arange(3, 90)[None], max_new_tokens=3)
    assert engine.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3).shape == (1, 6)
    _assert_no_leak(engine)


def test_a_request_that_alone_exhausts_the_pool_fails_clearly_and_the_next_one_runs():
    model = tiny_model("llama")
    engine = Engine(model, max_cache_bytes=16 * 16 * Engine(model).runner.bytes_per_token())
    with pytest.raises(ValueError, match="max_new_tokens.*") as error:
        engine.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=500, num_beams=2)
    assert "pool" in str(error.value)
    _assert_no_leak(engine)
    reference = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=20, num_beams=2)
    assert torch.equal(engine.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=20, num_beams=2), reference)
    _assert_no_leak(engine)


def test_an_engine_made_and_called_in_inference_mode_works():
    """The engine's thread writes the pool and the requests' state in place: they are ordinary tensors even when
    the engine and the call are made under torch.inference_mode."""
    model, prompt = tiny_model("llama"), torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        engine = Engine(model)
        out = engine.generate(prompt, max_new_tokens=5, num_beams=2, pad_token_id=PAD)
    assert torch.equal(out, model.generate(prompt, max_new_tokens=5, num_beams=2, pad_token_id=PAD))


def test_a_request_that_fits_with_plain_steps_runs_in_a_pool_too_small_for_its_drafts():
    """Drafting rounds wait for plain steps when only those fit: never a failure."""
    model, draft = tiny_model("llama"), tiny_model("llama", seed=1)
    pool = 40 * 16 * Engine(model).runner.bytes_per_token()
    engine = Engine(model, draft_model=draft, spec=SpecConfig(depth=4, adaptive=False), max_cache_bytes=pool)
    kwargs = dict(num_beams=4, max_new_tokens=10, pad_token_id=PAD, eos_token_id=2)
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    assert torch.equal(engine.generate(prompt, **kwargs), model.generate(prompt, **kwargs))
    _assert_no_leak(engine)


def test_a_preempted_request_recomputes_its_shared_prompt_once():
    """Four samples of one long prompt, preempted by an older request: recomputed, they share the prompt's blocks
    again, so they fit the pool as they did the first time."""
    model = tiny_model("llama")
    engine = Engine(model, max_cache_bytes=16 * 16 * Engine(model).runner.bytes_per_token())
    generator = torch.Generator().manual_seed(0)
    common = dict(pad_token_id=PAD, eos_token_id=2, suppress_tokens=[2])
    older = engine.add_request(torch.randint(3, 97, (1, 8), generator=generator), max_new_tokens=150, **common)
    younger = engine.add_request(torch.randint(3, 97, (1, 64), generator=generator), do_sample=True,
                                 num_return_sequences=4, max_new_tokens=20, **common)
    errors = {}
    while engine.has_unfinished_requests():
        errors.update({out.request_id: out.error for out in engine.step() if out.finished})
    assert engine.core.metrics()["preemptions"] > 0 and errors == {older: None, younger: None}
    _assert_no_leak(engine)


def test_a_step_that_breaks_fails_its_requests_and_the_engine_goes_on():
    engine = Engine(tiny_model("llama"))
    step, calls = engine.core.step, []

    def breaks_once():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bug in a step")
        return step()

    engine.core.step = breaks_once
    with pytest.raises(RuntimeError, match="a bug in a step"):
        engine.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=5, pad_token_id=PAD)
    assert engine.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=5, pad_token_id=PAD).shape == (1, 8)
    _assert_no_leak(engine)


def test_calls_in_and_out_of_inference_mode_share_an_engine():
    """The caller's thread steps the engine: whatever grad mode the call is made in, the state it leaves (pools,
    the draft's caches, made at first use) serves the next call made in another mode."""
    model, prompt = tiny_model("llama"), torch.tensor([[5, 6, 7]])
    engine = Engine(model, draft_model=perturbed_draft())
    reference = model.generate(prompt, max_new_tokens=6, num_beams=2, pad_token_id=PAD)
    with torch.inference_mode():
        first = engine.generate(prompt, max_new_tokens=6, num_beams=2, pad_token_id=PAD)
    second = engine.generate(prompt, max_new_tokens=6, num_beams=2, pad_token_id=PAD)
    with torch.inference_mode():
        third = engine.generate(prompt, max_new_tokens=6, num_beams=2, pad_token_id=PAD)
    assert all(torch.equal(out, reference) for out in (first, second, third))


def test_generate_steps_on_the_callers_thread():
    """No thread of the engine's own: the caller's thread runs the forwards (its OpenMP team is the one that
    exists; `specbeam.engine.loop`), and a streamer hears the tokens there, as under transformers."""
    engine, threads_before = Engine(tiny_model("llama")), threading.active_count()

    class Where(BaseStreamer):
        seen = set()

        def put(self, value):
            self.seen.add(threading.get_ident())

        def end(self):
            self.seen.add(threading.get_ident())

    streamer = Where()
    engine.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, pad_token_id=PAD, streamer=streamer)
    assert streamer.seen == {threading.get_ident()} and threading.active_count() == threads_before


def test_a_thread_given_to_the_loop_serves_submitted_requests_until_closed():
    engine, started, outputs = Engine(tiny_model("llama")), threading.Event(), []
    reference = engine.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, pad_token_id=PAD)
    stepper = threading.Thread(target=engine.loop.run_forever, kwargs=dict(started=started.set))
    stepper.start()
    started.wait()
    done = threading.Event()

    def on_output(output):
        outputs.append((threading.current_thread(), output))
        if output.finished:
            done.set()

    engine.loop.submit(torch.tensor([[5, 6, 7]]), on_output, max_new_tokens=4, pad_token_id=PAD)
    assert done.wait(timeout=60)
    engine.loop.close()
    stepper.join(timeout=60)
    assert not stepper.is_alive() and all(thread is stepper for thread, _ in outputs)
    assert outputs[-1][1].result.tolist() == reference.tolist()
    _assert_no_leak(engine)
