"""A real `specbeam serve` application on 127.0.0.1 for tests: uvicorn in a thread on a free port, stopped (and
its engine loop closed) when the block ends; clients for it; its /metrics parsed."""
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import openai
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from specbeam.serve import Server, create_app


@dataclass
class Live:
    url: str
    server: Server

    @property
    def model(self) -> str:
        return self.server.config.model_name

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def metrics(self) -> dict[tuple, float]:
        """{(sample name, sorted label pairs): value}."""
        text = httpx.get(f"{self.url}/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def engine_idle(self, timeout: float = 10.0) -> dict:
        """The engine's metrics once nothing runs or waits in it (or at the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.server.engine.core.metrics()
            if (m["requests_running"] == m["requests_waiting"] == 0) or time.monotonic() > deadline:
                return m
            time.sleep(0.02)


def metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@contextmanager
def serving(server: Server, startup_timeout: float = 120.0):
    config = uvicorn.Config(create_app(server), host="127.0.0.1", port=0, access_log=False, log_config=None)
    runner = uvicorn.Server(config)
    thread = threading.Thread(target=runner.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not runner.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = runner.servers[0].sockets[0].getsockname()[1]
    try:
        yield Live(f"http://127.0.0.1:{port}", server)
    finally:
        runner.should_exit = True
        thread.join(timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
