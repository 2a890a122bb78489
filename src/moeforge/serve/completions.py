"""POST /v1/completions: continue prompts, OpenAI's legacy completions API.

A prompt is text, a list of token ids, or a list of either (one choice set per prompt, choice index
`prompt * n + j`). `echo` returns the prompt before the completion; with `logprobs` it returns the
prompt tokens' log-probabilities too (None for the first token, which nothing predicts), the
numbers evaluation harnesses score text with. `max_tokens: 0` with `echo` scores the prompt without
generating: the engine generates one token, which is dropped (so the prompt must leave room for it).
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from moeforge.serve.api_errors import bad_field
from moeforge.serve.choice import ChoiceState, Delta, TokenEntry
from moeforge.serve.generation import (
    Answer,
    Served,
    check_model,
    check_tokens,
    collect,
    end_ids,
    event_stream,
    new_id,
    sampling_params,
    submit,
)
from moeforge.serve.protocol import CompletionRequest

OBJECT = "text_completion"


async def create_completion(served: Served, body: CompletionRequest, request: Request):
    check_model(served, body.model)
    answer = _answer(served, body)
    stream = await submit(served, answer)
    head = {"id": answer.id, "object": OBJECT, "created": answer.created, "model": served.model_name}
    want_logprobs = body.logprobs is not None
    if body.stream:

        def chunk(choice: ChoiceState, delta: Delta) -> dict | None:
            if not (delta.text or delta.entries or delta.finish_reason):
                return None
            logprobs = completion_logprobs(delta.entries) if want_logprobs else None
            return {**head, "choices": [_choice(choice.index, delta.text, logprobs, delta.finish_reason)]}

        def closing() -> list[dict]:
            return [{**head, "choices": [], "usage": answer.usage()}] if body.include_usage else []

        return event_stream(answer, stream, [], chunk, closing)
    await collect(request, answer, stream)
    choices = [
        _choice(c.index, c.text, completion_logprobs(c.entries) if want_logprobs else None, c.finish_reason)
        for c in answer.choices
    ]
    return JSONResponse({**head, "choices": choices, "usage": answer.usage()})


def _answer(served: Served, body: CompletionRequest) -> Answer:
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise bad_field("max_tokens", "got 0; allowed: an integer >= 1 (0 only with echo: score the prompt)")
    answer = Answer(new_id("cmpl"), [], _prompts(served, body.prompt), [])
    for p, prompt in enumerate(answer.prompts):
        for j in range(body.n):
            index = p * body.n + j
            echo_logprobs = body.echo and body.logprobs is not None
            engine_max = 1 if max_tokens == 0 else max_tokens  # scoring generates one token, dropped
            params = sampling_params(served, body, j, engine_max, body.logprobs, echo_logprobs)
            request_id = f"{answer.id}-{index}"
            answer.submissions.append((request_id, prompt, params))
            answer.choices.append(
                ChoiceState(
                    index,
                    request_id,
                    prompt,
                    served.tokenizer,
                    stop=body.stop_strings(),
                    end_ids=end_ids(served, body),
                    echo=body.echo,
                    logprobs=body.logprobs is not None,
                    keep_generated=max_tokens > 0,
                )
            )
    return answer


def _prompts(served: Served, prompt: str | list) -> list[list[int]]:
    """The token ids of each prompt: a string, a list of token ids, or a list of either."""
    if isinstance(prompt, str):
        return [check_tokens(served, served.tokenizer.encode(prompt), "prompt")]
    if not prompt:
        raise bad_field("prompt", "an empty list; allowed: a string, token ids, or a list of either")
    if all(isinstance(t, int) for t in prompt):
        return [check_tokens(served, prompt, "prompt")]
    return [
        check_tokens(served, served.tokenizer.encode(p) if isinstance(p, str) else p, f"prompt[{i}]")
        for i, p in enumerate(prompt)
    ]


def _choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_logprobs(entries: list[TokenEntry]) -> dict:
    """OpenAI's completions format: parallel lists of token strings, their log-probabilities, the
    most likely tokens at each position ({token: logprob}) and each token's offset in the text."""
    return {
        "tokens": [e.text for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [None if e.logprob is None else {t: v for t, _, v in e.top} for e in entries],
        "text_offset": [e.offset for e in entries],
    }
