"""`moeforge serve`: an OpenAI-compatible HTTP server over a trained model (docs/serving.md).

Loads the checkpoint, builds the continuous-batching engine with the limits the flags give, and
serves /v1/completions, /v1/chat/completions, /v1/models, /health and /metrics on 127.0.0.1 (another
--host exposes it) until SIGTERM, which drains the running requests before exiting 0."""

from __future__ import annotations

import argparse
import math
import os

from moeforge.cli.arguments import reject_extra
from moeforge.config import ConfigError, field_docs

API_KEY_ENV = "MOEFORGE_API_KEY"
ENGINE_FLAGS = ("max_batch", "cache_blocks", "block_size", "max_step_tokens", "max_waiting", "decode_steps")
"""EngineConfig fields given as flags (--max-batch N ...), with its defaults and docstrings"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    from moeforge.serve.requests import EngineConfig

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server over a trained model")
    serve.add_argument(
        "--checkpoint", required=True, help="a run directory (newest checkpoint) or one checkpoint"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port, printed)")
    serve.add_argument(
        "--api-key",
        default=None,
        help=f"every route but /health answers 401 without 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})",
    )
    serve.add_argument(
        "--model-name", default=None, help="the name clients use (default: the run directory's name)"
    )
    serve.add_argument("--device", default="cpu", help="'cpu', 'cuda' or 'cuda:N'")
    serve.add_argument(
        "--speculative",
        action="store_true",
        help=field_docs(EngineConfig)["speculative"] + " (needs an MTP model)",
    )
    serve.add_argument("--compile", action="store_true", help=field_docs(EngineConfig)["compile"])
    serve.add_argument(
        "--engine-process",
        action="store_true",
        help="run the engine in a process of its own, so that its forwards and the HTTP event loop "
        "run at the same time (one more process holds the model; the server holds only the tokenizer)",
    )
    serve.add_argument(
        "--no-prefix-reuse",
        dest="prefix_reuse",
        action="store_false",
        help="turn prefix reuse off; when on (the default): " + field_docs(EngineConfig)["prefix_reuse"],
    )
    serve.add_argument(
        "--drain-timeout",
        type=float,
        default=0,
        metavar="S",
        help="after SIGTERM, wait at most S seconds for the running requests, then stop without them "
        "(exit code 1); 0: wait as long as they take (default: 0)",
    )
    defaults = EngineConfig()
    for name in ENGINE_FLAGS:
        serve.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=getattr(defaults, name),
            metavar="N",
            help=f"{field_docs(EngineConfig).get(name, name.replace('_', ' '))} (default: %(default)s)",
        )
    serve.set_defaults(handler=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    reject_extra(rest)
    try:
        from moeforge.serve.app import build_app
        from moeforge.serve.server import listen, run_server
    except ImportError as err:  # fastapi, uvicorn, jinja2 or prometheus_client missing
        raise ConfigError(f"serve: needs {err.name}; allowed: pip install 'moeforge[serve]'") from None
    from moeforge.checkpoint.discovery import resolve_checkpoint
    from moeforge.checkpoint.model_loading import load_config_and_tokenizer
    from moeforge.serve.engine_process import RemoteEngine
    from moeforge.infer import load_model
    from moeforge.infer.generate import generation_device
    from moeforge.plan.memory_budget import check_checkpoint_fits
    from moeforge.serve.async_engine import AsyncEngine
    from moeforge.serve.chat_template import load_chat_template
    from moeforge.serve.engine import Engine
    from moeforge.serve.generation import Served, request_capacity
    from moeforge.serve.requests import EngineConfig

    # the flags first: a mistake is reported before any checkpoint is read
    config = EngineConfig(
        speculative=args.speculative,
        compile=args.compile,
        prefix_reuse=args.prefix_reuse,
        **{name: getattr(args, name) for name in ENGINE_FLAGS},
    )
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port: got {args.port}; allowed: 0 to 65535")
    if not (args.drain_timeout >= 0 and math.isfinite(args.drain_timeout)):
        raise ConfigError(f"--drain-timeout: got {args.drain_timeout}; allowed: seconds >= 0 (0: no limit)")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    device = generation_device(args.device)
    listen(args.host, args.port).close()  # the address is free before minutes of loading
    check_checkpoint_fits(
        args.checkpoint, device, config.cache_blocks * config.block_size
    )  # weights + paged cache
    checkpoint = resolve_checkpoint(args.checkpoint)
    run_dir = checkpoint.parent.parent
    template = load_chat_template(run_dir)  # a broken template is reported before the model is loaded
    name = args.model_name or run_dir.resolve().name
    if args.engine_process:
        _, tokenizer = load_config_and_tokenizer(checkpoint)
        engine = RemoteEngine(checkpoint, str(device), config)
    else:
        loaded = load_model(checkpoint, device)
        tokenizer = loaded.tokenizer
        engine = Engine(loaded.model, config, tokenizer.eos_id)
    try:
        threaded = AsyncEngine(engine, config.max_waiting)
        served = Served(threaded, tokenizer, name, request_capacity(engine), template)
        return run_server(
            build_app(served, api_key), threaded, name, args.host, args.port, args.drain_timeout or None
        )
    finally:
        if isinstance(engine, RemoteEngine):
            engine.close()
