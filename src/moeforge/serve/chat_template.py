"""A conversation to the text the model continues: the model's own chat template when its run
directory has one, else moeforge's documented default.

The template is the Jinja2 text Hugging Face tokenizers carry: `chat_template` in
`tokenizer_config.json` (a string, or a list of named templates of which "default" is used), or a
`chat_template.jinja` file beside it (where transformers >= 4.43 saves it). It is rendered as
transformers renders it: a sandboxed environment (a template is data from whoever made the model),
`trim_blocks` and `lstrip_blocks`, the loop-control extension, `raise_exception` and `strftime_now`,
`tojson` that keeps non-ASCII text, and the tokenizer's special tokens (`bos_token`, `eos_token`, ...)
as variables; `add_generation_prompt` is true, so the text ends where the assistant's answer starts.

The default, for models trained here on plain text (their byte tokenizer has no template):

    <|system|>\\nYou are terse.\\n<|user|>\\nHello\\n<|assistant|>\\n

one `<|role|>` line and the content per message, then `<|assistant|>` and a newline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moeforge.errors import MoeforgeError, first_line
from moeforge.run import CHAT_TEMPLATE_FILE, MAX_TEMPLATE_BYTES, TOKENIZER_CONFIG_FILE
from moeforge.safe_paths import FileMissing, read_inside

DEFAULT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatTemplateError(MoeforgeError):
    """A template that cannot be read or compiled: one line naming the file."""


class ConversationRefused(ValueError):
    """The template refused the conversation (its `raise_exception`, e.g. roles that do not
    alternate): the API answers 400 naming `messages`."""


@dataclass
class ChatTemplate:
    source: str
    origin: str
    """the file it came from, or 'default'"""
    special_tokens: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            self._template = _environment().from_string(self.source)
        except jinja2.TemplateError as err:
            raise ChatTemplateError(f"{self.origin}: chat_template does not compile: {first_line(err)}") from None

    def render(self, messages: list[dict[str, str]]) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)
        except ConversationRefused:
            raise
        except jinja2.TemplateError as err:  # a template that fails on this conversation
            raise ConversationRefused(f"the chat template ({self.origin}) failed: {first_line(err)}") from None


def load_chat_template(run_dir: Path) -> ChatTemplate:
    """The template in `run_dir` (chat_template.jinja first, then tokenizer_config.json's), else the default."""
    config = _tokenizer_config(run_dir)
    special = {name: _token_text(value) for name, value in config.items() if name.endswith("_token")}
    special = {name: text for name, text in special.items() if text is not None}
    try:
        source = read_inside(run_dir, CHAT_TEMPLATE_FILE, run_dir, MAX_TEMPLATE_BYTES).decode("utf-8", errors="replace")
        return ChatTemplate(source, str(run_dir / CHAT_TEMPLATE_FILE), special)
    except FileMissing:
        pass
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return ChatTemplate(template, str(run_dir / TOKENIZER_CONFIG_FILE), special)
    return ChatTemplate(DEFAULT_TEMPLATE, "default", special)


def _tokenizer_config(run_dir: Path) -> dict:
    try:
        data = read_inside(run_dir, TOKENIZER_CONFIG_FILE, run_dir, MAX_TEMPLATE_BYTES)
    except FileMissing:
        return {}
    try:
        config = json.loads(data)
    except (ValueError, RecursionError) as err:
        raise ChatTemplateError(f"{run_dir / TOKENIZER_CONFIG_FILE}: not valid JSON ({first_line(err)})") from None
    if not isinstance(config, dict):
        raise ChatTemplateError(f"{run_dir / TOKENIZER_CONFIG_FILE}: a JSON {type(config).__name__}, not an object")
    return config


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _tojson(value: object, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ConversationRefused(f"the chat template refused the conversation: {message}")
