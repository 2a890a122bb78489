"""The server's text layer without a model: incremental decoding equals decoding the whole sequence
(byte tokenizer and a byte-level BPE), stop strings cut the text where they start even across
tokens and are never streamed, log-probability entries land at their text offsets, chat templates
render as transformers renders them, and request bodies name the field at fault."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from moeforge.data.tokenizer import ByteTokenizer, HFTokenizer
from moeforge.serve.chat_template import DEFAULT_TEMPLATE, ChatTemplate, ConversationRefused, load_chat_template
from moeforge.serve.choice import ChoiceState
from moeforge.serve.detokenize import IncrementalDecoder, decode_with_offsets, token_bytes, token_text
from moeforge.serve.protocol import ChatCompletionRequest, CompletionRequest
from moeforge.serve.requests import RequestOutput, TokenLogprob

from test_data import SENTENCES, write_bpe_tokenizer

BYTES = ByteTokenizer()


def streamed(tokenizer, tokens, context=()) -> list[str]:
    decoder = IncrementalDecoder(tokenizer, context)
    return [decoder.push(t) for t in tokens] + [decoder.flush()]


@pytest.mark.parametrize("text", ["héllo wörld — 日本語 🐍", "plain ascii", "€€€"])
def test_byte_by_byte_decoding_holds_back_incomplete_characters(text):
    pieces = streamed(BYTES, BYTES.encode(text))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_an_invalid_byte_is_released_as_a_replacement_character():
    assert "".join(streamed(BYTES, [104, 0xFF, 105])) == "h\ufffdi"
    assert "".join(streamed(BYTES, [104, 0xE2, 0x82])) == BYTES.decode([104, 0xE2, 0x82])  # cut short at the end


def test_bpe_decoding_in_pieces_equals_decoding_the_whole(tmp_path):
    tok = HFTokenizer(write_bpe_tokenizer(tmp_path / "tok.json", ["<|endoftext|>"]))
    for text in SENTENCES + ["unseen wörds ✓ and 🐍🐍"]:
        ids = tok.encode(text)
        assert "".join(streamed(tok, ids)) == tok.decode(ids) == text
        prompt, rest = ids[:3], ids[3:]
        assert tok.decode(prompt) + "".join(streamed(tok, rest, context=prompt)) == text


def test_offsets_and_token_strings():
    text, offsets = decode_with_offsets(BYTES, BYTES.encode("aé b"))
    assert text == "aé b" and offsets == [0, 1, 1, 2, 3]  # both bytes of é start where é starts
    assert token_text(BYTES, ord("a")) == "a" and token_bytes(BYTES, 0xC3) == b"\xc3"
    assert token_text(BYTES, 0xC3) == "bytes:\\xc3"


def outputs(tokens, finish="length", per_step=1, rid="r"):
    """The engine's outputs for `tokens`, `per_step` tokens each, the last one finished."""
    chunks = [tokens[i : i + per_step] for i in range(0, len(tokens), per_step)]
    return [RequestOutput(rid, chunk, finish_reason=finish if i == len(chunks) - 1 else None) for i, chunk in enumerate(chunks)]


def run(choice, tokens, **kw):
    return [choice.update(o) for o in outputs(tokens, **kw)]


@pytest.mark.parametrize("per_step", [1, 3])
def test_a_stop_string_across_tokens_cuts_the_text_and_is_never_streamed(per_step):
    choice = ChoiceState(0, "r", BYTES.encode("Q"), BYTES, stop=["STOP", "xyz"])
    deltas = run(choice, BYTES.encode("abc STOP def"), per_step=per_step)
    assert choice.text == "abc " and choice.finish_reason == "stop"
    stopped = [d for d in deltas if d.stop_string]
    assert len(stopped) == 1 and stopped[0].finish_reason == "stop"
    assert "".join(d.text for d in deltas) == "abc "
    assert choice.generated == len("abc STOP")  # the tokens after the match were never consumed


def test_text_that_might_start_a_stop_string_waits_then_flows():
    choice = ChoiceState(0, "r", [65], BYTES, stop=["<|end"])
    deltas = run(choice, BYTES.encode("a<|en b"))
    assert [d.text for d in deltas] == ["a", "", "", "", "", "<|en ", "b"]
    assert choice.text == "a<|en b" and choice.finish_reason == "length"


def test_the_end_token_ends_the_answer_without_text():
    eos = 3
    choice = ChoiceState(0, "r", [65], BYTES, end_ids=[eos], logprobs=True)
    out = RequestOutput("r", [104, 105, eos], [TokenLogprob(t, -1.0) for t in (104, 105, eos)], finish_reason="stop")
    delta = choice.update(out)
    assert delta.text == choice.text == "hi" and delta.finish_reason == "stop" and not delta.stop_string
    assert [e.offset for e in choice.entries] == [0, 1, 2]  # the end token is listed, at the end


def test_echo_with_logprobs_lists_the_prompt_then_the_answer():
    prompt = BYTES.encode("ab")
    choice = ChoiceState(0, "r", prompt, BYTES, echo=True, logprobs=True)
    given = [None, TokenLogprob(98, -0.5, ((98, -0.5), (99, -1.5)))]
    assert choice.update(RequestOutput("r", [])).text == ""  # a prefill chunk: nothing yet
    delta = choice.update(RequestOutput("r", [99], [TokenLogprob(99, -2.0)], prompt_logprobs=given, finish_reason="length"))
    assert delta.text == choice.text == "abc"
    assert [(e.text, e.logprob, e.offset) for e in choice.entries] == [("a", None, 0), ("b", -0.5, 1), ("c", -2.0, 2)]
    assert choice.entries[1].top == (("b", b"b", -0.5), ("c", b"c", -1.5))


def test_scoring_only_drops_the_generated_token():
    choice = ChoiceState(0, "r", BYTES.encode("ab"), BYTES, echo=True, keep_generated=False)
    choice.update(RequestOutput("r", [99], finish_reason="length"))
    assert choice.text == "ab" and choice.generated == 0 and choice.finish_reason == "length"


def test_the_default_chat_template():
    rendered = ChatTemplate(DEFAULT_TEMPLATE, "default").render(
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    )
    assert rendered == "<|system|>\nBe terse.\n<|user|>\nHi\n<|assistant|>\n"


def test_a_tokenizer_config_template_is_used_with_its_special_tokens(tmp_path):
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('no system role') }}{% endif %}[{{ m['role'] }}] {{ m['content'] | tojson }}\n"
        "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    config = {"chat_template": template, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = load_chat_template(tmp_path)
    assert loaded.origin.endswith("tokenizer_config.json")
    assert loaded.render([{"role": "user", "content": "café"}]) == '<s>[user] "café"\n[assistant] '
    with pytest.raises(ConversationRefused, match="no system role"):
        loaded.render([{"role": "system", "content": "x"}])
    assert load_chat_template(tmp_path / "elsewhere").origin == "default"


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "x", "logit_bias": {}}, "logit_bias"),
        ({"prompt": "x", "temperature": float("nan")}, "temperature"),
        ({"prompt": "x", "top_p": float("inf")}, "top_p"),
        ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
        ({"prompt": "x", "stop": ["ok", ""]}, "stop"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": 3}, "prompt"),
    ],
)
def test_a_bad_completion_body_names_its_field(body, field):
    with pytest.raises(ValidationError) as err:
        CompletionRequest.model_validate(body)
    assert err.value.errors()[0]["loc"][0] == field


def test_chat_bodies_accept_text_parts_and_refuse_other_parts():
    body = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    )
    assert body.messages[0].text() == "ab"
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
