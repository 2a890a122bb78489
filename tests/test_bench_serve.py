"""`moeforge bench serve`: the figures from known arrival times (a simulated batching server whose
step cost is injected: throughput and latencies must follow it), the stream parser on both servers'
event formats, the clients' bounds in count and time, one-line errors naming the flag, and one small
real run of our own server."""

from __future__ import annotations

import asyncio
import sys

import pytest

from moeforge.bench import serve as bench_serve
from moeforge.bench.serve import ServeBenchSettings, format_table, run_serve_bench, summarize_cases
from moeforge.bench.serve_client import fixed_length_prompts, parse_event, run_clients
from moeforge.bench.serve_measure import RequestTrace, percentile, same_texts, summarize
from moeforge.bench.serve_servers import ServerCase, byte_characters
from moeforge.cli import main
from moeforge.config import ConfigError
from moeforge.data.tokenizer import ByteTokenizer


def simulated_traces(requests: int, prefill_s: float, step_s: float, tokens: int) -> list[RequestTrace]:
    """A batching server that takes every request at t = 0, prefills them together (`prefill_s`), then
    gives each request one token per step (`step_s`), streamed one per arrival."""
    traces = []
    for index in range(requests):
        chunks = [prefill_s + step * step_s for step in range(tokens)]
        traces.append(RequestTrace(index, 0.0, chunks, f"text {index}", tokens, 64, finished=True))
    return traces


def test_known_arrival_times_give_known_figures():
    figures = summarize(simulated_traces(16, prefill_s=0.2, step_s=0.01, tokens=11), output_tokens=11)
    assert figures.completed == 16 and figures.output_tokens == 176 and figures.short == 0
    assert figures.duration_s == pytest.approx(0.3)
    assert figures.tokens_per_s == pytest.approx(176 / 0.3)
    assert figures.ttft_ms == pytest.approx({"p50": 200.0, "p99": 200.0})
    assert figures.itl_ms == pytest.approx({"p50": 10.0, "p99": 10.0})
    assert figures.tpot_ms == pytest.approx({"p50": 10.0, "p99": 10.0})
    assert figures.prompt_tokens == [64]


def test_percentiles_interpolate_between_order_statistics():
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0
    trace = RequestTrace(0, 0.0, [0.5, 0.6, 1.6], "abc", 3, 4, finished=True)  # one slow gap of three
    figures = summarize([trace], output_tokens=3)
    assert figures.itl_ms["p50"] == pytest.approx(550.0) and figures.itl_ms["p99"] == pytest.approx(991.0)
    assert figures.tpot_ms["p50"] == pytest.approx(550.0)


def test_throughput_ratios_follow_an_injected_cost():
    """A server three times slower per step and per prefill shows a third of the throughput and three
    times the latencies; the paired ratio to the baseline says so in every repeat."""
    fast = summarize(simulated_traces(16, 0.2, 0.01, 64), 64)
    slow = summarize(simulated_traces(16, 0.6, 0.03, 64), 64)
    assert slow.tokens_per_s / fast.tokens_per_s == pytest.approx(1 / 3)
    assert slow.ttft_ms["p99"] == pytest.approx(3 * fast.ttft_ms["p99"])
    assert slow.itl_ms["p50"] == pytest.approx(3 * fast.itl_ms["p50"])
    runs = {
        "moeforge": [{"repeat": r, "tokens_per_s": fast.tokens_per_s, "ttft_ms": fast.ttft_ms, "itl_ms": fast.itl_ms,
                      "tpot_ms": fast.tpot_ms, "completed": 16, "requests": 16, "short": 0} for r in range(3)],
        "transformers": [{"repeat": r, "tokens_per_s": slow.tokens_per_s * (1 + r), "ttft_ms": slow.ttft_ms,
                          "itl_ms": slow.itl_ms, "tpot_ms": slow.tpot_ms, "completed": 16, "requests": 16,
                          "short": 0} for r in range(3)],
    }  # fmt: skip
    ratio = summarize_cases(runs)["moeforge"]["vs_transformers"]
    assert ratio == pytest.approx({"median": 1.5, "min": 1.0, "max": 3.0})  # 3/1, 3/2, 3/3: paired per repeat
    assert summarize_cases(runs)["transformers"]["vs_transformers"] is None


def test_failed_short_and_unequal_requests_are_counted_not_hidden():
    traces = simulated_traces(4, 0.1, 0.01, 8)
    traces[1].output_tokens = 5  # an end token that was not ignored
    traces[2].error = "HTTP 500: boom"
    traces[3].finished = False  # cut off at --max-seconds
    figures = summarize(traces, output_tokens=8)
    assert (figures.requests, figures.completed, figures.short) == (4, 2, 1)
    assert figures.output_tokens == 8 + 5 and figures.first_error == "HTTP 500: boom"
    reference = simulated_traces(4, 0.1, 0.01, 8)
    reference[0].text = "other"
    assert same_texts(traces, reference) == 1  # request 1 only: 0 differs, 2 and 3 did not complete


def test_both_servers_event_formats_parse():
    ours = 'data: {"id": "c", "choices": [{"index": 0, "text": "ab", "logprobs": null, "finish_reason": null}]}'
    theirs = 'data: {"id":"c","choices":[{"index":0,"text":"7E"}],"object":"text_completion"}'
    usage = 'data: {"id":"c","choices":[],"usage":{"completion_tokens":16,"prompt_tokens":45,"total_tokens":61}}'
    assert parse_event(ours).text == "ab" and parse_event(theirs).text == "7E"
    assert (parse_event(usage).completion_tokens, parse_event(usage).prompt_tokens) == (16, 45)
    assert parse_event("data: [DONE]") is None and parse_event("") is None and parse_event(": ping") is None
    assert parse_event('data: {"error": {"message": "engine failed"}}').error == "engine failed"
    assert parse_event('data: {"error": "worker died"}').error == "worker died"


def test_clients_are_bounded_in_count_and_in_time():
    async def scenario(block_from: int, max_seconds: float) -> tuple[list[RequestTrace], int]:
        in_flight, most = 0, 0
        blocked = asyncio.Event()

        async def send(trace: RequestTrace) -> None:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            await (blocked.wait() if trace.index >= block_from else asyncio.sleep(0.001))
            trace.chunks, trace.finished = [0.0], True
            in_flight -= 1

        return await run_clients(send, 20, 4, max_seconds), most

    traces, most = asyncio.run(scenario(block_from=20, max_seconds=30))
    assert [t.index for t in traces] == list(range(20)) and most == 4 and all(t.completed for t in traces)
    traces, _ = asyncio.run(scenario(block_from=6, max_seconds=0.2))  # requests 6.. never finish
    assert [t.index for t in traces] == list(range(10))  # 0-5 done, then 4 clients stuck on 6-9
    assert all(t.completed for t in traces[:6])
    assert all(t.error == "not finished within --max-seconds 0.2" for t in traces[6:])


def test_prompts_have_the_asked_token_count_and_the_byte_table_is_a_bijection():
    prompts = fixed_length_prompts(ByteTokenizer(), 64, 5, seed=0)
    assert [len(ByteTokenizer().encode(p)) for p in prompts] == [64] * 5 and len(set(prompts)) == 5
    assert prompts == fixed_length_prompts(ByteTokenizer(), 64, 5, seed=0)
    table = byte_characters()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256 and table[ord("A")] == "A"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--clients", "0"], "--clients: got 0"),
        (["--output-tokens", "-1"], "--output-tokens: got -1"),
        (["--cases", "moeforge,vllm"], "--cases: got vllm"),
        (["--preset", "nope"], "--preset: got nope"),
        (["--checkpoint", "x", "--preset", "tiny"], "--preset: a fresh model is made only without --checkpoint"),
        (["--max-seconds", "0"], "--max-seconds: got 0"),
    ],
)
def test_bad_options_are_one_line_errors_naming_the_flag(argv, message, capsys):
    assert main(["bench", "serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_model_that_cannot_hold_the_request_is_refused_before_any_server_starts():
    with pytest.raises(ConfigError, match="--output-tokens: prompt 64 \\+ output 500"):
        run_serve_bench(ServeBenchSettings(output_tokens=500, cases=("moeforge",)))
    with pytest.raises(ConfigError, match="--cases: speculative needs a model with MTP modules"):
        run_serve_bench(ServeBenchSettings(preset="tiny", cases=("speculative",)))


@pytest.mark.slow  # two server subprocesses started, timed twice each and stopped: 11 s at load average 6, 26 s at 14
def test_a_small_real_run_of_our_own_server(monkeypatch):
    """2 clients, 4 requests of 8 + 6 tokens against a real `moeforge serve` subprocess, plain and
    speculative: every request completes with exactly the tokens asked, the texts agree (greedy on the
    same weights), speculation's figures come from /metrics, and the servers exit 0 after SIGTERM.
    The peer is replaced by a command that fails at start: its row says why, the others still run."""

    def failing_peer(model, port):
        argv = [sys.executable, "-c", "import sys; print('no accelerate here'); sys.exit(3)"]
        return ServerCase("transformers", argv, port)

    monkeypatch.setattr(bench_serve, "transformers_case", failing_peer)
    monkeypatch.setattr(bench_serve, "_missing_peer", lambda: None)  # the stand-in needs no transformers
    settings = ServeBenchSettings(clients=2, requests=4, prompt_tokens=8, output_tokens=6, repeats=2)
    result = run_serve_bench(settings)
    assert result["skipped"] == {
        "transformers": "failed to start: transformers: exited with code 3 before serving: no accelerate here"
    }
    assert set(result["runs"]) == {"moeforge", "speculative"} and result["exit_codes"] == {"moeforge": 0, "speculative": 0}
    for case in ("moeforge", "speculative"):
        assert [run["repeat"] for run in result["runs"][case]] == [0, 1]  # one server, up for both repeats
        for run in result["runs"][case]:
            assert (run["completed"], run["output_tokens"], run["short"]) == (4, 24, 0)
            assert run["prompt_tokens"] == [8] and run["tokens_per_s"] > 0 and run["ttft_ms"]["p50"] > 0
    speculative = result["runs"]["speculative"][0]
    assert speculative["same_text"] == 4 and 0 <= speculative["acceptance"] <= 1
    assert 1 <= speculative["tokens_per_round"] <= 2 and result["runs"]["moeforge"][0]["acceptance"] is None
    table = format_table(result)
    assert "moeforge --speculative" in table and "8/8" in table and "transformers serve       skipped: failed" in table
