"""`moeforge serve` over HTTP: a real uvicorn server on a free port (in a thread, over the real engine
and a tiny freshly initialised model), driven by the official `openai` client and plain httpx.

Parity with the trainer (issue 28, item 4): greedy tokens equal `moeforge.infer.generate`, and the
log-probabilities `echo` returns equal the log-softmax of the model's full forward within 1e-4
(fp32), alone and with 8 requests in flight. The model's output head is restricted to printable
ASCII (the other rows zeroed, the printable ones scaled up), so that greedy text is its tokens byte
for byte and top-2 margins are wide; a greedy mismatch is accepted only where the reference's top-2
margin is below the tolerance (a tie), and the test says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from moeforge.cli import main
from moeforge.cli.serve import ENGINE_FLAGS
from moeforge.data.tokenizer import ByteTokenizer
from moeforge.infer import SamplingConfig, generate
from moeforge.infer.generate import generate_batch
from moeforge.model.transformer import Transformer
from moeforge.serve.app import build_app
from moeforge.serve.async_engine import AsyncEngine
from moeforge.serve.chat_template import DEFAULT_TEMPLATE, ChatTemplate
from moeforge.serve.engine import Engine
from moeforge.serve.generation import Served, request_capacity
from moeforge.serve.requests import EngineConfig, SamplingParams
from moeforge.serve.server import DrainingServer, listen, server_config

from conftest import small_config

NAME = "tiny"
KEY = "test-key"
HOST = "127.0.0.1"
TOL = 1e-4
"""log-probabilities equal the trainer's forward within this (fp32); greedy ties below it are reported"""
CONFIG = EngineConfig(max_batch=8, cache_blocks=64, block_size=16, max_step_tokens=128, max_waiting=64)
PROMPTS = ["The ", "def main():", "Mixture-of-Experts", "a", "hello world, this is", "0123", "x = [", "print("]


class Running:
    """A server on a free port in a thread of its own, over an `Engine` of its own copy of the model
    (the engine attaches its paged caches to the model it serves; references use another copy)."""

    def __init__(
        self,
        config: EngineConfig = CONFIG,
        api_key: str | None = KEY,
        engine: Engine | None = None,
        drain_timeout_s: float | None = None,
    ):
        engine = engine or Engine(printable_model(), config, None)
        self.engine = AsyncEngine(engine, config.max_waiting)
        template = ChatTemplate(DEFAULT_TEMPLATE, "default")
        served = Served(self.engine, ByteTokenizer(), NAME, request_capacity(engine), template)
        self.server = DrainingServer(
            server_config(build_app(served, api_key), HOST, 0), self.engine, NAME, drain_timeout_s
        )
        sock = listen(HOST, 0)
        self.thread = threading.Thread(target=asyncio.run, args=(self.server.serve([sock]),), daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        # `port` is set after uvicorn's `started` (once the listening socket is known): wait for it
        wait_until(lambda: self.server.port is not None, "the server to listen")
        self.url = f"http://{HOST}:{self.server.port}"
        return self

    def __exit__(self, *exc) -> None:
        self.engine.resume()
        self.server.should_exit = True
        self.thread.join(30)

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=60)

    def post(self, path: str, content: bytes | dict, key: str | None = KEY, timeout_s: float = 60) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if isinstance(content, dict):
            return httpx.post(self.url + path, json=content, headers=headers, timeout=timeout_s)
        headers["Content-Type"] = "application/json"
        return httpx.post(self.url + path, content=content, headers=headers, timeout=timeout_s)


def wait_until(predicate, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def printable_model(**overrides: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(small_config(**overrides).model).eval()
    keep = torch.zeros(model.cfg.vocab_size)
    keep[32:127] = 4.0
    with torch.no_grad():
        model.output.weight.mul_(keep[:, None])
    return model


@pytest.fixture(scope="module")
def model() -> Transformer:
    """The reference: the same weights as every server's model, never given to an engine."""
    return printable_model()


@pytest.fixture(scope="module")
def server():
    with Running() as running:
        yield running


def reference_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    return generate(model, prompt, n, SamplingConfig(temperature=0)).new_tokens


@torch.no_grad()
def forward_logprobs(model: Transformer, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab]: row i is log p(. | tokens[:i+1]), the trainer's forward in fp32."""
    return torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), dim=-1)


def assert_greedy_equal(model: Transformer, prompt: list[int], got: list[int], expected: list[int]) -> None:
    """Token for token, except after a position where the reference's top-2 margin is below TOL."""
    if got == expected:
        return
    i = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b) if len(got) == len(expected) else 0
    top2 = forward_logprobs(model, prompt + expected[:i])[-1].topk(2).values
    margin = float(top2[0] - top2[1])
    assert margin < TOL, f"greedy tokens differ at {i} with a top-2 margin of {margin:.2e}: {got} vs {expected}"
    print(f"greedy tie at token {i} (top-2 margin {margin:.2e} < {TOL}): the rest is not compared")


def token_ids(tokens: list[str]) -> list[int]:
    """The byte tokenizer's ids from OpenAI's token strings ('a', or 'bytes:\\xNN')."""
    ids = []
    for t in tokens:
        ids += [int(h, 16) for h in t[6:].split("\\x")[1:]] if t.startswith("bytes:") else list(t.encode())
    return ids


def test_greedy_completions_equal_generate_alone_and_with_8_in_flight(server, model):
    prompts = [list(p.encode()) for p in PROMPTS]
    expected = generate_batch(model, prompts, 16, SamplingConfig(temperature=0)).new_tokens  # = generate, one by one
    alone = server.client().completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=16, temperature=0)
    assert alone.choices[0].finish_reason == "length" and alone.usage.completion_tokens == 16
    assert_greedy_equal(model, prompts[0], list(alone.choices[0].text.encode()), expected[0])

    async def together():
        async with server.async_client() as client:
            calls = [client.completions.create(model=NAME, prompt=p, max_tokens=16, temperature=0) for p in PROMPTS]
            return await asyncio.gather(*calls)

    for prompt, want, answer in zip(prompts, expected, asyncio.run(together())):
        assert_greedy_equal(model, prompt, list(answer.choices[0].text.encode()), want)


def check_echo(model: Transformer, prompt: list[int], choice) -> int:
    """The echoed log-probabilities (prompt and generated) against the full forward; the worst gap."""
    lp = choice.logprobs
    tokens = token_ids(lp.tokens)
    assert tokens[: len(prompt)] == prompt and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    reference = forward_logprobs(model, tokens)
    want = reference[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])]
    got = torch.tensor(lp.token_logprobs[1:])
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    best = torch.tensor([max(top.values()) for top in lp.top_logprobs[1:]])
    torch.testing.assert_close(best, reference[:-1].max(dim=-1).values, atol=TOL, rtol=0)
    assert lp.text_offset == list(range(len(tokens))) or not choice.text.isascii()
    return len(tokens) - len(prompt)


def test_echo_logprobs_equal_the_trainers_forward_alone_and_with_8_in_flight(server, model):
    prompts = [list(p.encode()) for p in PROMPTS]
    scored = server.client().completions.create(model=NAME, prompt=prompts[1], max_tokens=0, echo=True, logprobs=1)
    assert scored.choices[0].text == PROMPTS[1] and scored.usage.completion_tokens == 0
    assert check_echo(model, prompts[1], scored.choices[0]) == 0

    async def together():
        async with server.async_client() as client:
            calls = [
                client.completions.create(
                    model=NAME, prompt=p, max_tokens=12, echo=True, logprobs=2, temperature=1.0, seed=i
                )
                for i, p in enumerate(prompts)
            ]
            return await asyncio.gather(*calls)

    for prompt, answer in zip(prompts, asyncio.run(together())):
        assert check_echo(model, prompt, answer.choices[0]) == 12


def test_chat_follows_the_default_template_and_streams_the_same_answer(server, model):
    client = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = list(b"<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n")
    answer = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2
    )
    choice = answer.choices[0]
    assert answer.usage.prompt_tokens == len(prompt) and choice.finish_reason == "length"
    assert_greedy_equal(model, prompt, list(choice.message.content.encode()), reference_greedy(model, prompt, 10))
    entries = choice.logprobs.content
    assert [e.bytes for e in entries] == [[b] for b in choice.message.content.encode()]
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == pytest.approx(e.logprob) for e in entries)

    chunks = list(
        client.chat.completions.create(
            model=NAME, messages=messages, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == answer.usage.total_tokens


def test_a_streamed_completion_equals_the_whole_one_with_the_same_seed(server):
    client = server.client()
    whole = client.completions.create(model=NAME, prompt="The ", max_tokens=20, temperature=1.0, seed=11)
    chunks = list(
        client.completions.create(
            model=NAME, prompt="The ", max_tokens=20, temperature=1.0, seed=11, stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 20


def test_n_choices_are_seed_plus_i_and_a_seed_reproduces_its_choice(server):
    client = server.client()
    many = client.completions.create(model=NAME, prompt="x = [", max_tokens=12, temperature=1.0, seed=5, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2] and many.usage.completion_tokens == 36
    for j, choice in enumerate(many.choices):
        alone = client.completions.create(model=NAME, prompt="x = [", max_tokens=12, temperature=1.0, seed=5 + j)
        assert alone.choices[0].text == choice.text
    assert len({c.text for c in many.choices}) > 1


def test_a_stop_string_ends_the_text_where_it_starts(server, model):
    reference = bytes(reference_greedy(model, list(b"The "), 24)).decode()
    stop = reference[6:9]
    expected = reference[: reference.index(stop)]
    client = server.client()
    answer = client.completions.create(model=NAME, prompt="The ", max_tokens=24, temperature=0, stop=[stop, "\x01never"])
    assert answer.choices[0].text == expected and answer.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=NAME, prompt="The ", max_tokens=24, temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected and chunks[-1].choices[0].finish_reason == "stop"
    wait_until(lambda: server.engine.stats().running == 0, "the stopped requests to leave the engine")


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b'{"prompt": "x", "bogus": 1}', 400, "bogus"),
        (b'{"prompt": "x",', 400, None),
        (b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
        (b'{"prompt": "x", "temperature": -1}', 400, "temperature"),
        (b'{"prompt": "x", "top_p": 0}', 400, "top_p"),
        (b'{"prompt": "x", "seed": 99999999999999999999}', 400, "seed"),
        (b'{"prompt": "x", "max_tokens": 500}', 400, "max_tokens"),
        (b'{"prompt": "' + b"x" * 200 + b'"}', 400, "prompt"),
        (b'{"prompt": [1, 256]}', 400, "prompt"),
        (b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
        (b'{"prompt": "x", "max_tokens": -1}', 400, "max_tokens"),
        (b'{"prompt": "x", "top_k": 257}', 400, "top_k"),
        (b'{"prompt": ["x", "y"], "n": 33}', 400, "n"),
        (b'{"prompt": "x", "model": "other"}', 404, "model"),
    ],
)
def test_a_bad_completion_request_is_a_4xx_naming_the_field(server, body, status, param):
    answer = server.post("/v1/completions", body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and (param is None or error["message"].startswith(f"{param}: "))
    assert set(error) == {"message", "type", "param", "code"}


def test_the_openai_client_sees_a_400_naming_the_field(server):
    with pytest.raises(openai.BadRequestError) as err:
        server.client().chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "x"}], temperature=150
        )
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        server.client().chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], top_logprobs=3)
    assert err.value.body["param"] == "top_logprobs"


def test_the_api_key_guards_every_route_but_health(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    for path in ("/v1/models", "/metrics", "/v1/nothing"):
        answer = httpx.get(server.url + path)
        assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
    assert server.post("/v1/completions", {"prompt": "x"}, key=None).status_code == 401
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert [m.id for m in server.client().models.list().data] == [NAME]


def test_metrics_are_prometheus_text(server):
    server.client().completions.create(model=NAME, prompt="a", max_tokens=2)
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {
        "moeforge_http_requests", "moeforge_queue_length", "moeforge_running_requests", "moeforge_cache_blocks_used",
        "moeforge_cache_blocks_total", "moeforge_generated_tokens", "moeforge_tokens_per_second",
        "moeforge_preemptions", "moeforge_speculative_drafted_tokens", "moeforge_speculative_accepted_tokens",
        "moeforge_speculative_acceptance_rate",
    }
    assert expected <= families.keys()
    answered = {(s.labels["path"], s.labels["status"]): s.value for s in families["moeforge_http_requests"].samples}
    assert answered[("/v1/completions", "200")] >= 1
    assert families["moeforge_cache_blocks_total"].samples[0].value == CONFIG.cache_blocks
    assert families["moeforge_generated_tokens"].samples[0].value >= 2


class PausingEngine(Engine):
    """An engine that pauses its AsyncEngine right after its first step that produced tokens: a test
    then knows its request is running and holds cache blocks, however slow the machine."""

    on_tokens = None

    def step(self):
        outputs = super().step()
        if any(o.new_tokens for o in outputs) and self.on_tokens is not None:
            self.on_tokens()
            self.on_tokens = None
        return outputs


def paused_with_a_running_request(running: Running) -> None:
    wait_until(lambda: running.engine.stats().running == 1, "the request to run and the engine to pause")
    assert running.engine.stats().cache_blocks_used > 0 and running.engine.in_flight == 1


def pausing_server() -> Running:
    engine = PausingEngine(printable_model(), CONFIG, None)
    running = Running(engine=engine)
    engine.on_tokens = running.engine.pause
    return running


def test_a_client_that_disconnects_mid_stream_frees_its_blocks():
    with pausing_server() as running:
        body = {"model": NAME, "prompt": "The ", "max_tokens": 100, "temperature": 0, "stream": True}
        auth = {"Authorization": f"Bearer {KEY}"}
        with httpx.stream("POST", running.url + "/v1/completions", json=body, headers=auth) as response:
            lines = response.iter_lines()  # held: closing this iterator would close the connection
            next(line for line in lines if line.startswith("data: "))
            paused_with_a_running_request(running)
        # the connection is closed with 99 tokens to go, and the paused engine will not step again
        wait_until(lambda: running.engine.stats().cache_blocks_used == 0, "the aborted request's blocks to be freed")
        assert running.engine.stats().running == 0 and running.engine.in_flight == 0


def test_a_client_that_leaves_before_a_whole_answer_frees_its_blocks():
    with pausing_server() as running:
        body = json.dumps({"model": NAME, "prompt": "The ", "max_tokens": 100}).encode()
        head = f"POST /v1/completions HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {KEY}\r\n"
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        with socket.create_connection((HOST, running.server.port)) as client:
            client.sendall(head.encode() + body)
            paused_with_a_running_request(running)
        wait_until(lambda: running.engine.stats().cache_blocks_used == 0, "the abandoned request's blocks to be freed")
        assert running.engine.stats().running == 0 and running.engine.in_flight == 0
        wait_until(lambda: metric_values(running, "moeforge_http_requests").get("499"), "the 499 to be counted")


def metric_values(running: Running, labelled: str | None = None) -> dict[str, float]:
    """The unlabelled samples by name, or those of the family `labelled` by their status label."""
    text = httpx.get(running.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    if labelled is not None:
        return {s.labels["status"]: s.value for s in samples if s.name == f"{labelled}_total"}
    return {s.name: s.value for s in samples if not s.labels}


def test_speculative_serving_keeps_greedy_tokens_and_reports_its_acceptance():
    reference = printable_model(model__mtp_depth="1")
    config = dataclasses.replace(CONFIG, speculative=True)
    with Running(config, engine=Engine(printable_model(model__mtp_depth="1"), config, None)) as running:
        prompt = list(b"The ")
        answer = running.client().completions.create(model=NAME, prompt="The ", max_tokens=16, temperature=0)
        assert_greedy_equal(reference, prompt, list(answer.choices[0].text.encode()), reference_greedy(reference, prompt, 16))
        values = metric_values(running)
        # without max_tokens an answer may fill the context, less the position speculation drafts past it
        chat = running.client().chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}])
        assert chat.choices[0].finish_reason == "length" and chat.usage.total_tokens == reference.cfg.max_seq_len - 1
    drafted, accepted = values["moeforge_speculative_drafted_tokens_total"], values["moeforge_speculative_accepted_tokens_total"]
    assert drafted > 0 and 0 <= accepted <= drafted and values["moeforge_speculative_verify_rounds_total"] > 0
    assert values["moeforge_speculative_acceptance_rate"] == pytest.approx(accepted / drafted)


def test_a_full_queue_answers_429_with_retry_after():
    with Running(dataclasses.replace(CONFIG, max_waiting=1)) as running:
        running.engine.pause()
        first = Background(lambda: running.client().completions.create(model=NAME, prompt="a", max_tokens=4))
        wait_until(lambda: running.engine.stats().waiting == 1, "the first request to queue")
        with pytest.raises(openai.RateLimitError) as err:
            running.client().completions.create(model=NAME, prompt="b", max_tokens=4)
        assert err.value.response.headers["retry-after"] == "1"
        running.engine.resume()
        assert first.result().usage.completion_tokens == 4


def sigterm_with_a_stream_in_flight(running: Running) -> Background:
    """Pause the engine, submit a streamed completion of 8 tokens, and send the server SIGTERM while
    the request is in flight; the stream's client, in its own thread."""
    running.engine.pause()
    client = running.client()
    stream = Background(
        lambda: list(client.completions.create(model=NAME, prompt="The ", max_tokens=8, temperature=0, stream=True))
    )
    wait_until(lambda: running.engine.in_flight == 1, "the stream to be submitted")
    running.server.handle_exit(signal.SIGTERM, None)
    return stream


def test_sigterm_drains_running_streams_and_refuses_new_requests_with_503():
    with Running() as running:
        stream = sigterm_with_a_stream_in_flight(running)
        wait_until(lambda: running.engine.draining, "the drain to start")
        refused = running.post("/v1/completions", {"prompt": "x"})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert httpx.get(running.url + "/health").status_code == 503
        running.engine.resume()
        chunks = stream.result()
        assert len("".join(c.choices[0].text for c in chunks).encode()) == 8
        assert chunks[-1].choices[0].finish_reason == "length"
        running.thread.join(30)
        assert not running.thread.is_alive()  # the server left by itself once drained


def test_a_drain_past_its_timeout_stops_without_the_requests_still_running(capsys):
    """--drain-timeout 0.5 with a request that cannot finish (the engine is paused): the server stops
    by itself within the timeout (forced: exit code 1), saying how many requests it cut."""
    with Running(drain_timeout_s=0.5) as running:
        stream = sigterm_with_a_stream_in_flight(running)
        running.thread.join(20)
        assert not running.thread.is_alive() and running.server.force_exit
        assert "1 request(s) still running after --drain-timeout 0.5 s" in capsys.readouterr().err
        with pytest.raises(openai.APIConnectionError):  # its connection was closed under it
            stream.result()


def test_an_engine_failure_fails_requests_with_500_instead_of_hanging():
    class FailingOnStep2(Engine):
        steps = 0

        def step(self):
            self.steps += 1
            if self.steps == 2:  # after the step that prefilled and gave the first token
                raise RuntimeError("boom")
            return super().step()

    with Running(engine=FailingOnStep2(printable_model(), CONFIG, None)) as running, contextlib.redirect_stderr(sys.stdout):
        client = running.client()
        stream = client.completions.create(model=NAME, prompt="a", max_tokens=8, temperature=0, stream=True)
        with pytest.raises(openai.APIError, match="boom"):  # the 200 was sent: an error event ends the stream
            list(stream)
        with pytest.raises(openai.InternalServerError, match="boom"):
            client.completions.create(model=NAME, prompt="a", max_tokens=4)
        assert httpx.get(running.url + "/health").json()["status"] == "failed"


def test_async_engine_without_http_aborts_a_request_its_consumer_leaves():
    async def main():
        engine = AsyncEngine(Engine(printable_model(), CONFIG, None), CONFIG.max_waiting)
        engine.start()
        try:
            got = [o async for o in engine.generate("a", list(b"The "), SamplingParams(max_tokens=5, temperature=0))]
            assert sum(len(o.new_tokens) for o in got) == 5 and got[-1].finish_reason == "length"
            async for _ in engine.generate("b", list(b"The "), SamplingParams(max_tokens=100, temperature=0)):
                break  # the consumer leaves: the generator closes and aborts "b"
            await asyncio.sleep(0)
            while engine.in_flight or engine.stats().cache_blocks_used:
                await asyncio.sleep(0.01)
        finally:
            engine.stop()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_outputs_that_queue_while_their_consumer_is_busy_arrive_merged():
    """A consumer that reads nothing until its request has finished gets one output: every token and
    log-probability in order, the finish reason; the tokens are those of the engine alone."""
    model, params = printable_model(), SamplingParams(max_tokens=6, temperature=0, logprobs=1)

    async def main():
        engine = AsyncEngine(Engine(model, CONFIG, None), CONFIG.max_waiting)
        engine.start()
        try:
            with await engine.submit([("a", list(b"The "), params)]) as stream:
                while engine.in_flight:  # the engine delivers the last output, nothing read yet
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0)  # the delivery's callback puts the outputs in the queue
                return [output async for output in stream]
        finally:
            engine.stop()

    got = asyncio.run(asyncio.wait_for(main(), 30))
    assert len(got) == 1 and got[0].finish_reason == "length"
    alone = Engine(model, CONFIG, None)
    alone.add_request("a", list(b"The "), params)
    steps = [output for _ in range(6) for output in alone.step()]
    assert got[0].new_tokens == [token for output in steps for token in output.new_tokens]
    assert [e.token for e in got[0].logprobs] == got[0].new_tokens


@pytest.mark.slow
def test_an_engine_process_answers_as_the_engine_in_process_and_its_death_fails_requests_with_500(tmp_path, model):
    """`serve --engine-process`: greedy completions equal `generate` on the same weights, a request
    the engine refuses is the same one-line RequestError, and a killed engine process makes the next
    request a 500 instead of a hang."""
    from moeforge.checkpoint import store
    from moeforge.checkpoint.discovery import resolve_checkpoint
    from moeforge.serve.engine_process import RemoteEngine
    from moeforge.serve.requests import RequestError

    store.save_checkpoint(tmp_path / "run", 1, printable_model(), None, small_config().to_dict(), {}, keep=1)
    remote = RemoteEngine(resolve_checkpoint(tmp_path / "run"), "cpu", CONFIG)
    try:
        with pytest.raises(RequestError, match="^prompt: ") as refused:
            remote.add_request("long", [1] * 10_000, SamplingParams())
        assert refused.value.field == "prompt"
        # a request added while the child runs a step asked ahead, in which the last request
        # finishes: the stale "no work" of that step's answer must not stop the stepping
        remote.add_request("first", list(b"The "), SamplingParams(max_tokens=2, temperature=0))
        outputs = remote.step()  # the child is asked for the next step before this returns
        remote.add_request("second", list(b"The "), SamplingParams(max_tokens=3, temperature=0))
        while remote.has_work:
            outputs += remote.step()
        finished = {o.request_id: o.finish_reason for o in outputs if o.finished}
        assert finished == {"first": "length", "second": "length"}
        with Running(engine=remote) as running:

            async def complete_all() -> list[str]:
                client = running.async_client()
                answers = await asyncio.gather(
                    *(client.completions.create(model=NAME, prompt=p, max_tokens=8, temperature=0) for p in PROMPTS)
                )
                return [a.choices[0].text for a in answers]

            texts = asyncio.run(complete_all())
            expected = [bytes(reference_greedy(model, list(p.encode()), 8)).decode() for p in PROMPTS]
            assert texts == expected
            remote._process.kill()
            failed = running.post("/v1/completions", {"model": NAME, "prompt": "The ", "max_tokens": 4})
            assert failed.status_code == 500 and "engine process" in failed.json()["error"]["message"]
    finally:
        remote.close()


class Background:
    """`call()` in a thread; `result()` joins it and returns or raises what it did."""

    def __init__(self, call) -> None:
        self._outcome: list = []
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call) -> None:
        try:
            self._outcome.append((True, call()))
        except BaseException as err:  # noqa: BLE001 -- handed to the test's thread
            self._outcome.append((False, err))

    def result(self, timeout_s: float = 60.0):
        self._thread.join(timeout_s)
        ok, value = self._outcome[0]
        if not ok:
            raise value
        return value


@pytest.mark.parametrize(
    "flags, code, message",
    [
        (["--max-batch", "0"], 2, "--max-batch: got 0; allowed: an integer >= 1"),
        (["--max-batch", "8", "--max-step-tokens", "4"], 2, "--max-step-tokens: got 4; allowed: at least --max-batch (8)"),
        (["--port", "70000"], 2, "--port: got 70000; allowed: 0 to 65535"),
        (["--drain-timeout", "-1"], 2, "--drain-timeout: got -1.0; allowed: seconds >= 0 (0: no limit)"),
        (["--device", "gpu"], 2, "--device: got 'gpu'"),
        ([], 1, "--checkpoint: no complete checkpoint in '/nowhere'"),
    ],
)
def test_serve_flags_are_one_line_errors_before_any_checkpoint_is_read(flags, code, message, capsys):
    assert main(["serve", "--checkpoint", "/nowhere", "--port", "0", *flags]) == code
    err = capsys.readouterr().err
    assert err.startswith("moeforge serve: error: ") and message in err and len(err.splitlines()) == 1


def test_serve_refuses_speculation_without_an_mtp_module_and_has_a_flag_per_engine_limit(tmp_path, model, capsys):
    from moeforge.checkpoint import store

    store.save_checkpoint(tmp_path, 1, model, None, small_config().to_dict(), {}, keep=1)
    assert main(["serve", "--checkpoint", str(tmp_path), "--port", "0", "--speculative"]) == 2
    assert capsys.readouterr().err.startswith("moeforge serve: error: --speculative: ")  # the engine says why
    assert {*ENGINE_FLAGS, "speculative", "compile", "prefix_reuse"} == {f.name for f in dataclasses.fields(EngineConfig)}


@pytest.mark.slow
def test_the_serve_command_prints_its_address_answers_and_exits_0_on_sigterm(tmp_path, model):
    from moeforge.checkpoint import store

    cfg = small_config()
    store.save_checkpoint(tmp_path / "run", 1, model, None, cfg.to_dict(), {}, keep=1)
    command = [sys.executable, "-m", "moeforge", "serve", "--checkpoint", str(tmp_path / "run"), "--port", "0"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        line = proc.stdout.readline()
        assert line.startswith("serving run on http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[-1]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answer = client.completions.create(model="run", prompt="The ", max_tokens=6, temperature=0)
        assert list(answer.choices[0].text.encode()) == reference_greedy(model, list(b"The "), 6)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stderr.read()
