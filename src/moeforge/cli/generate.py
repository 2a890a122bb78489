"""`moeforge generate`: continue a prompt with a trained model, plainly or speculatively (the MTP
modules draft), and print the text with its speed and memory traffic."""

from __future__ import annotations

import argparse
import json
import sys

from moeforge.cli.arguments import reject_extra
from moeforge.config import ConfigError


def add_parser(commands: argparse._SubParsersAction) -> None:
    gen = commands.add_parser("generate", help="continue a prompt with a trained model")
    gen.add_argument(
        "--checkpoint", required=True, help="a run directory (newest checkpoint) or one checkpoint"
    )
    gen.add_argument("--prompt", default="The ", help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 = no top-k filtering")
    gen.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus filtering")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.add_argument(
        "--speculative",
        action="store_true",
        help="draft with the model's MTP modules, verify with one forward per round; plain decoding is "
        "timed too, for the speed-up",
    )
    gen.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decoding step (CUDA: as a CUDA graph); the compilation, timed apart as "
        "compile_s, comes before the first token, so off by default",
    )
    gen.set_defaults(handler=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    reject_extra(rest)
    from moeforge.infer import SamplingConfig, generate, load_model
    from moeforge.infer.generate import check_prompt_text, check_seed, generation_device
    from moeforge.model.flops import kv_cache_comparison
    from moeforge.plan.memory_budget import check_checkpoint_fits

    # made (and so checked) first: a mistake in the flags is reported before any checkpoint is read
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: got {args.max_new_tokens}; allowed: an integer >= 1")
    check_prompt_text(args.prompt)
    check_seed(args.seed)
    device = generation_device(args.device)
    # then the model's size, from the checkpoint's meta.json, before it is built (a byte a token at most)
    check_checkpoint_fits(args.checkpoint, device, len(args.prompt.encode()) + args.max_new_tokens)
    loaded = load_model(args.checkpoint, device)
    prompt = loaded.tokenizer.encode(args.prompt)
    result = generate(
        loaded.model, prompt, args.max_new_tokens, sampling, args.seed, loaded.tokenizer.eos_id, args.compile
    )
    text = loaded.tokenizer.decode(result.new_tokens)
    element_size = loaded.model.tok_embeddings.weight.element_size()
    report = {
        "text": text,
        "prompt": args.prompt,
        "new_tokens": len(result.new_tokens),
        "tokens_per_s": result.tokens_per_s,
        "prefill_s": result.prefill_s,
        "compile_s": result.compile_s,
        "bytes_per_token": result.bytes_per_token,
        "bandwidth_gb_s": result.bandwidth_gb_s,
        "kv_bytes_per_token": result.kv_bytes_per_token,
        "kv_bytes_per_token_by_attention": kv_cache_comparison(loaded.model.cfg, element_size),
        "checkpoint": str(loaded.checkpoint),
        "step": loaded.step,
    }
    if args.speculative:
        report.update(_speculative_report(args, loaded, prompt, sampling, result))
    if args.json:
        print(json.dumps(report))
    else:
        print(args.prompt + report["text"])
        if args.speculative:
            print(
                f"\n[speculative: {report['tokens_per_s']:.1f} tokens/s vs plain {report['plain_tokens_per_s']:.1f}"
                f" ({report['speedup']:.2f}x), acceptance {report['acceptance_rate']:.1%}]",
                file=sys.stderr,
            )
        print(
            f"\n[{report['new_tokens']} tokens, {result.tokens_per_s:.1f} tokens/s, "
            f"{result.bytes_per_token / 1e6:.2f} MB read/token -> {result.bandwidth_gb_s:.3f} GB/s; "
            f"checkpoint step {loaded.step}]",
            file=sys.stderr,
        )
    return 0


def _speculative_report(args, loaded, prompt, sampling, plain) -> dict:
    """The speculative run's text and figures, compared with the plain run `plain` of the same request."""
    from moeforge.infer.speculative import comparison_with_plain, speculative_generate

    eos = loaded.tokenizer.eos_id
    spec = speculative_generate(loaded.model, prompt, args.max_new_tokens, sampling, args.seed, eos, args.compile)
    figures = comparison_with_plain(spec, plain, greedy=sampling.temperature == 0)
    return {"text": loaded.tokenizer.decode(spec.new_tokens), "new_tokens": len(spec.new_tokens), **figures}
