"""POST /v1/chat/completions: answer a conversation, OpenAI's chat API.

The messages are rendered by the model's chat template (chat_template.py) and tokenized as one text;
the answer is what the model writes after the assistant's turn opens. Without `max_tokens` (or
`max_completion_tokens`) an answer may run to the end of the context, as OpenAI's does. Streams open
with each choice's `{"role": "assistant"}` delta, then send text deltas, then a delta with the
finish reason.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from moeforge.serve.api_errors import bad_field
from moeforge.serve.chat_template import ConversationRefused
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
from moeforge.serve.protocol import ChatCompletionRequest

OBJECT = "chat.completion"
CHUNK_OBJECT = "chat.completion.chunk"


async def create_chat_completion(served: Served, body: ChatCompletionRequest, request: Request):
    check_model(served, body.model)
    answer = _answer(served, body)
    stream = await submit(served, answer)
    head = {"id": answer.id, "created": answer.created, "model": served.model_name}
    if body.stream:
        opening = [
            {**head, "object": CHUNK_OBJECT, "choices": [_chunk_choice(c.index, {"role": "assistant", "content": ""})]}
            for c in answer.choices
        ]

        def chunk(choice: ChoiceState, delta: Delta) -> dict | None:
            if not (delta.text or delta.entries or delta.finish_reason):
                return None
            content = {"content": delta.text} if delta.text else {}
            logprobs = chat_logprobs(delta.entries) if body.logprobs else None
            choices = [_chunk_choice(choice.index, content, logprobs, delta.finish_reason)]
            return {**head, "object": CHUNK_OBJECT, "choices": choices}

        def closing() -> list[dict]:
            return [{**head, "object": CHUNK_OBJECT, "choices": [], "usage": answer.usage()}] if body.include_usage else []

        return event_stream(answer, stream, opening, chunk, closing)
    await collect(request, answer, stream)
    choices = [
        {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": chat_logprobs(c.entries) if body.logprobs else None,
            "finish_reason": c.finish_reason,
        }
        for c in answer.choices
    ]
    return JSONResponse({**head, "object": OBJECT, "choices": choices, "usage": answer.usage()})


def _answer(served: Served, body: ChatCompletionRequest) -> Answer:
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_field("top_logprobs", "given without logprobs; allowed: with logprobs: true")
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in body.messages]
    try:
        text = served.chat_template.render(messages)
    except ConversationRefused as err:
        raise bad_field("messages", str(err)) from None
    prompt = check_tokens(served, served.tokenizer.encode(text), "messages")
    max_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:
        max_tokens = served.max_context - len(prompt)
        if max_tokens < 1:
            raise bad_field(
                "messages", f"the conversation is {len(prompt)} tokens; allowed: fewer than the context ({served.max_context})"
            )
    rename = {"max_tokens": max_field, "logprobs": "top_logprobs", "prompt": "messages"}
    answer = Answer(new_id("chatcmpl"), [], [prompt], [], rename)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    for j in range(body.n):
        request_id = f"{answer.id}-{j}"
        answer.submissions.append((request_id, prompt, sampling_params(served, body, j, max_tokens, logprobs, rename=rename)))
        answer.choices.append(
            ChoiceState(
                j,
                request_id,
                prompt,
                served.tokenizer,
                stop=body.stop_strings(),
                end_ids=end_ids(served, body),
                logprobs=body.logprobs,
            )
        )
    return answer


def _chunk_choice(index: int, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_logprobs(entries: list[TokenEntry]) -> dict:
    """OpenAI's chat format: per token its text, log-probability, UTF-8 bytes and the most likely
    tokens at its position."""
    return {
        "content": [
            {
                "token": e.text,
                "logprob": e.logprob,
                "bytes": list(e.bytes),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": list(b)} for t, b, v in e.top],
            }
            for e in entries
        ]
    }
