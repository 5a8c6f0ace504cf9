"""`specbeam serve` on 127.0.0.1, spoken to with the official `openai` client and raw `httpx`: outputs equal
`Engine.generate`'s, streaming framing, concurrency, disconnects, metrics, bad input; shipped pair, few tokens."""
import asyncio
import copy
import json
import logging
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from specbeam import Engine
from specbeam.assets import PAIR_DIR, load_default_pair
from specbeam.serve import ServeConfig, Server
from serving import free_port, metric, serving

PROMPTS = [json.loads(line)["prompt"][-160:] for line in
           (PAIR_DIR.parent / "prompts.jsonl").read_text().splitlines()[:4]]
TEMPLATE = ("{% for m in messages %}# {{ m.role }}: {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}# assistant:\n{% endif %}")
SERVERS = ["with_draft", "plain"]


@pytest.fixture(scope="module")
def pair():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield load_default_pair()


@pytest.fixture(scope="module")
def chat_tokenizer(pair):
    tokenizer = copy.deepcopy(pair[2])
    tokenizer.chat_template = TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def with_draft(pair):
    """The shipped pair, speculative in every mode; its tokenizer has no chat template."""
    target, draft, tokenizer = pair
    with serving(Server(target, tokenizer, draft, ServeConfig("pair"))) as live:
        yield live


@pytest.fixture(scope="module")
def plain(pair, chat_tokenizer):
    """The shipped target alone, with a chat template."""
    with serving(Server(pair[0], chat_tokenizer, None, ServeConfig("plain"))) as live:
        yield live


@pytest.fixture(scope="module")
def engines(pair):
    """Reference engines, apart from the servers': with the draft and without."""
    target, draft, _ = pair
    return {"with_draft": Engine(target, draft_model=draft), "plain": Engine(target)}


def expected_texts(engine: Engine, tokenizer, prompt_ids: list[int], **kwargs) -> list[str]:
    sequences = engine.generate(torch.tensor([prompt_ids]), return_dict_in_generate=True, **kwargs).sequences
    return [tokenizer.decode(row[len(prompt_ids):], skip_special_tokens=True) for row in sequences]


def sampling(seed: int, n: int = 1) -> tuple[dict, dict]:
    """(request fields, the generate arguments the server must turn them into)."""
    fields = dict(temperature=0.8, top_p=0.95, n=n, seed=seed)
    kwargs = dict(do_sample=True, temperature=0.8, top_p=0.95, top_k=0, num_return_sequences=n,
                  generator=torch.Generator().manual_seed(seed))
    return fields, kwargs


# --- outputs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVERS)
def test_greedy_and_beam_search_equal_engine_generate(request, name, pair, engines):
    live, tokenizer = request.getfixturevalue(name), pair[2]
    client = live.openai()
    for prompt in PROMPTS[:3]:
        ids = tokenizer(prompt).input_ids
        greedy = client.completions.create(model=live.model, prompt=prompt, max_tokens=12, temperature=0)
        assert [c.text for c in greedy.choices] == expected_texts(engines[name], tokenizer, ids, max_new_tokens=12)
        assert greedy.usage.prompt_tokens == len(ids) and greedy.usage.completion_tokens == 12
        beams = client.completions.create(model=live.model, prompt=prompt, max_tokens=10, n=2,
                                          extra_body={"use_beam_search": True, "best_of": 4})
        assert [c.text for c in beams.choices] == expected_texts(
            engines[name], tokenizer, ids, max_new_tokens=10, num_beams=4, num_return_sequences=2)


@pytest.mark.parametrize("name", SERVERS)
def test_sampling_with_a_seed_is_reproducible(request, name, pair, engines):
    live, tokenizer = request.getfixturevalue(name), pair[2]
    fields, kwargs = sampling(seed=7, n=2)
    ids = tokenizer(PROMPTS[0]).input_ids
    runs = [[c.text for c in live.openai().completions.create(model=live.model, prompt=PROMPTS[0], max_tokens=12,
                                                              **fields).choices] for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    assert runs[0] == expected_texts(engines[name], tokenizer, ids, max_new_tokens=12, **kwargs)


def test_chat_goes_through_the_template(plain, chat_tokenizer, engines):
    messages = [{"role": "system", "content": "Write Python."}, {"role": "user", "content": "def read_lines(path):"}]
    text = chat_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = chat_tokenizer(text, add_special_tokens=False).input_ids
    [expected] = expected_texts(engines["plain"], chat_tokenizer, ids, max_new_tokens=10)
    client = plain.openai()
    answer = client.chat.completions.create(model=plain.model, messages=messages, max_tokens=10, temperature=0,
                                            logprobs=True, top_logprobs=2)
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.content == expected
    assert answer.usage.prompt_tokens == len(ids)
    tokens = answer.choices[0].logprobs.content
    assert len(tokens) == answer.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in tokens)
    assert all(t.token == t.top_logprobs[0].token and t.logprob == pytest.approx(t.top_logprobs[0].logprob)
               for t in tokens)  # greedy: each token is the most likely one
    chunks = list(client.chat.completions.create(model=plain.model, messages=messages, max_tokens=10,
                                                  temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_without_a_template_is_refused(with_draft):
    with pytest.raises(openai.BadRequestError) as refused:
        with_draft.openai().chat.completions.create(model=with_draft.model,
                                                    messages=[{"role": "user", "content": "hi"}])
    error = refused.value.body
    assert error["param"] == "messages" and "no chat template" in error["message"]


def test_logprobs_are_the_models_own(plain, pair, engines):
    ids = pair[2](PROMPTS[1]).input_ids
    answer = plain.openai().completions.create(model=plain.model, prompt=PROMPTS[1], max_tokens=6, temperature=0,
                                               logprobs=3)
    out = engines["plain"].generate(torch.tensor([ids]), max_new_tokens=6, return_dict_in_generate=True,
                                    output_logits=True)
    logp = torch.log_softmax(torch.cat(out.logits), dim=-1)  # [steps, vocab]
    expected = logp.gather(1, out.sequences[0, len(ids):, None])[:, 0].tolist()
    logprobs = answer.choices[0].logprobs
    assert logprobs.token_logprobs == pytest.approx(expected, abs=1e-4)
    assert "".join(logprobs.tokens) == answer.choices[0].text and all(len(t) == 3 for t in logprobs.top_logprobs)


def test_models_and_health(with_draft):
    assert [m.id for m in with_draft.openai().models.list().data] == ["pair"]
    assert httpx.get(f"{with_draft.url}/health").json() == {"status": "ok"}


# --- streaming ---------------------------------------------------------------------------------------------


def sse_events(url: str, body: dict) -> list[str]:
    """The raw `data:` payloads of one streamed request, checking the framing on the way."""
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    payloads = [e[len("data: "):] for e in events[:-1]]
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    return payloads[:-1]


def streamed_texts(payloads: list[str]) -> tuple[dict[int, str], dict[int, str], list[dict]]:
    """(text per choice, finish reason per choice, usage chunks)."""
    texts, reasons, usage = {}, {}, []
    for chunk in map(json.loads, payloads):
        if not chunk["choices"]:
            usage.append(chunk["usage"])
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            if choice["finish_reason"] is not None:
                reasons[choice["index"]] = choice["finish_reason"]
    return texts, reasons, usage


@pytest.mark.parametrize("fields", [dict(temperature=0), dict(temperature=0, stop=["\n"]),
                                    dict(use_beam_search=True, n=2), dict(temperature=0, echo=True)],
                         ids=["greedy", "stop", "beam", "echo"])
def test_sse_stream_equals_the_whole_answer(with_draft, fields):
    body = dict(model=with_draft.model, prompt=PROMPTS[2], max_tokens=12, **fields)
    whole = httpx.post(f"{with_draft.url}/v1/completions", json=body, timeout=120).json()
    texts, reasons, usage = streamed_texts(sse_events(
        with_draft.url, {**body, "stream": True, "stream_options": {"include_usage": True}}))
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}
    assert reasons == {c["index"]: c["finish_reason"] for c in whole["choices"]}
    assert usage == [whole["usage"]]
    if "stop" in fields:
        assert reasons == {0: "stop"} and "\n" not in texts[0]


@pytest.mark.parametrize("name", SERVERS)
def test_64_concurrent_streaming_clients_in_mixed_modes_get_their_solo_answers(request, name):
    live = request.getfixturevalue(name)
    modes = [dict(temperature=0), sampling(seed=3)[0], dict(use_beam_search=True, n=4), sampling(seed=5, n=2)[0]]
    bodies = [dict(model=live.model, prompt=p, max_tokens=8, stream=True, **f) for p in PROMPTS for f in modes]
    solo = [streamed_texts(sse_events(live.url, body))[0] for body in bodies]
    finished = metric(live.metrics(), "specbeam_requests_total", state="finished")
    together = asyncio.run(stream_all(live.url, bodies * 4))
    for i, texts in enumerate(together):
        body = bodies[i % len(bodies)]
        assert len(texts) == body.get("n", 1)
        assert texts == solo[i % len(bodies)], body
    assert metric(live.metrics(), "specbeam_requests_total", state="finished") == finished + len(together)
    assert live.engine_idle()["kv_blocks_used"] == 0


async def stream_all(url: str, bodies: list[dict]) -> list[dict[int, str]]:
    async def one(client: httpx.AsyncClient, body: dict) -> dict[int, str]:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = [line async for line in response.aiter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        return streamed_texts([line[len("data: "):] for line in lines[:-1]])[0]

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=len(bodies))) as client:
        return await asyncio.gather(*(one(client, body) for body in bodies))


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(plain, caplog):
    aborted = metric(plain.metrics(), "specbeam_requests_total", state="aborted")
    body = dict(model=plain.model, prompt=PROMPTS[0], max_tokens=800, temperature=0, stream=True)
    with caplog.at_level(logging.INFO, logger="specbeam.serve"):
        with httpx.stream("POST", f"{plain.url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
        left = time.monotonic()
        idle = plain.engine_idle()
        assert idle["kv_blocks_used"] == 0 and time.monotonic() - left < 5
        assert metric(plain.metrics(), "specbeam_requests_total", state="aborted") == aborted + 1
    [line] = [r.getMessage() for r in caplog.records if " aborted greedy " in r.getMessage()]
    assert int(line.split("generated=")[1].split()[0]) < 800
    assert plain.openai().completions.create(model=plain.model, prompt="x", max_tokens=2).choices[0].text is not None


def test_a_full_queue_answers_503_with_retry_after(pair):
    config = ServeConfig("busy", max_num_seqs=1, max_queue=0)
    with serving(Server(pair[0], pair[2], None, config)) as live:
        body = dict(model="busy", prompt=PROMPTS[0], max_tokens=800, temperature=0, stream=True)
        with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=60) as running:
            lines = running.iter_lines()  # kept: a dropped line iterator closes the stream
            assert next(lines).startswith("data: {")  # admitted: the one place is taken
            refused = httpx.post(f"{live.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        answered = httpx.post(f"{live.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
        assert answered.status_code == 200
        assert metric(live.metrics(), "specbeam_requests_total", state="rejected") == 1
        assert live.engine_idle()["kv_blocks_used"] == 0


# --- metrics -----------------------------------------------------------------------------------------------


def test_metrics_count_what_happened(with_draft, pair):
    before = with_draft.metrics()
    ids = pair[2](PROMPTS[3]).input_ids
    with_draft.openai().completions.create(model=with_draft.model, prompt=PROMPTS[3], max_tokens=8, temperature=0)
    httpx.post(f"{with_draft.url}/v1/completions", json={"prompt": PROMPTS[3], "max_tokens": 0})
    after = with_draft.metrics()

    def grew(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("specbeam_requests_total", state="finished") == grew("specbeam_requests_total", state="invalid") == 1
    assert grew("specbeam_prompt_tokens_total") == len(ids) and grew("specbeam_generation_tokens_total") == 8
    for histogram in ("time_to_first_token", "time_per_output_token", "e2e_request_latency"):
        assert grew(f"specbeam_{histogram}_seconds_count") == 1
    assert metric(after, "specbeam_kv_blocks_total") > 0 and metric(after, "specbeam_kv_blocks_used") == 0
    assert metric(after, "specbeam_num_requests", state="running") == metric(after, "specbeam_queue_depth") == 0
    assert metric(after, "specbeam_draft_tokens_total") > 0
    assert metric(after, "specbeam_draft_accepted_tokens_total", depth="1") > 0


# --- bad input ---------------------------------------------------------------------------------------------

USER = [{"role": "user", "content": "hi"}]
BAD_INPUT = [  # (endpoint, body, status, param)
    ("completions", b'{"prompt": "x",', 400, None),
    ("completions", b'["prompt"]', 400, None),
    ("completions", {}, 400, "prompt"),
    ("completions", {"prompt": 5}, 400, "prompt"),
    ("completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("completions", {"prompt": "x", "n": "2"}, 400, "n"),
    ("completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("completions", {"prompt": "x", "top_k": -2}, 400, "top_k"),
    ("completions", {"prompt": "x", "min_p": 1.5}, 400, "min_p"),
    ("completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("completions", {"prompt": "x", "seed": -1}, 400, "seed"),
    ("completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("completions", {"prompt": ""}, 400, "prompt"),
    ("completions", {"prompt": []}, 400, "prompt"),
    ("completions", {"prompt": [5, 99999]}, 400, "prompt"),
    ("completions", {"prompt": "x " * 3000}, 400, "prompt"),
    ("completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("completions", {"prompt": "x", "n": 2, "temperature": 0}, 400, "n"),
    ("completions", {"prompt": "x", "best_of": 3}, 400, "best_of"),
    ("completions", {"prompt": "x", "use_beam_search": True, "n": 4, "best_of": 2}, 400, "best_of"),
    ("completions", {"prompt": "x", "use_beam_search": True, "n": 100}, 400, "n"),
    ("completions", {"prompt": "x", "use_beam_search": True, "early_stopping": "soon"}, 400, "early_stopping"),
    ("completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("completions", {"prompt": "x", "echo": True, "logprobs": 1}, 400, "echo"),
    ("completions", {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {"messages": "hi"}, 400, "messages"),
    ("chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages"),
    ("chat/completions", {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat/completions", {"messages": USER, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("chat/completions", {"messages": USER, "max_tokens": 2000}, 400, "max_tokens"),
]


def post(url: str, endpoint: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(f"{url}/v1/{endpoint}", content=body, headers={"content-type": "application/json"})
    return httpx.post(f"{url}/v1/{endpoint}", json=body, timeout=60)


@pytest.mark.parametrize("endpoint, body, status, param", BAD_INPUT)
def test_bad_input_gets_an_openai_error_naming_the_field(plain, endpoint, body, status, param):
    response = post(plain.url, endpoint, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


def test_bad_input_is_counted_leaks_nothing_and_the_server_keeps_serving(plain):
    invalid = metric(plain.metrics(), "specbeam_requests_total", state="invalid")
    for endpoint, body, _, _ in BAD_INPUT:
        post(plain.url, endpoint, body)
    with pytest.raises(openai.BadRequestError):
        plain.openai().completions.create(model=plain.model, prompt="x", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        plain.openai().completions.create(model="gpt-4", prompt="x")
    after = plain.metrics()
    assert metric(after, "specbeam_requests_total", state="invalid") == invalid + len(BAD_INPUT) + 2
    assert plain.engine_idle()["kv_blocks_used"] == 0
    assert plain.openai().completions.create(model=plain.model, prompt="x", max_tokens=3).usage.completion_tokens > 0


# --- the command -------------------------------------------------------------------------------------------


def test_serve_command_logs_requests_and_stops_cleanly_on_sigterm():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "specbeam.cli", "serve", "--port", str(port), "--draft", "ngram", "--threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        body = dict(prompt=PROMPTS[0], max_tokens=24, temperature=0, stream=True)
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: {")
            process.send_signal(signal.SIGTERM)  # the running request still finishes
            assert [line for line in lines if line][-1] == "data: [DONE]"
        assert process.wait(timeout=60) == 0
        log = process.stdout.read()
        assert " finished greedy prompt=" in log and "generated=24" in log and "Shutting down" in log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
