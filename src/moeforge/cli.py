"""`moeforge` command line: parse, call into the library, print. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from pathlib import Path

from moeforge.config import ConfigError, available_presets, format_choices, iter_options, load_config
from moeforge.errors import MoeforgeError, print_line
from moeforge.runtime import keep_freed_memory


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 2
    args, rest = parser.parse_known_args(argv)
    keep_freed_memory()
    code = _run_command(args, rest)
    if _joined_process_group():  # under torchrun: leave so that no peer, and no exit, can fail
        from moeforge.parallel import leave_process_group

        leave_process_group(code)
    return code


def _run_command(args: argparse.Namespace, rest: list[str]) -> int:
    """The command's exit code. A `MoeforgeError` (a user error, a checkpoint or training failure)
    and a lost peer are one line on stderr (naming the rank under torchrun); a bug keeps its traceback."""
    where = f"moeforge {args.command}: " + (f"rank {os.environ.get('RANK', '?')}: " if _launched() else "")
    try:
        return args.handler(args, rest)
    except MoeforgeError as err:
        _ignore_sigterm()
        print_line(f"{where}error: {err}")
        return err.exit_code
    except Exception as err:
        _ignore_sigterm()
        failure = _peer_failure(err)
        if failure is None and not _joined_process_group():
            raise
        if failure is None:  # a bug: its traceback, then leave the group like every rank
            traceback.print_exc()
            return 1
        print_line(f"{where}error: {failure}; {_AFTER_PEER_FAILURE}")
        return 1


def _ignore_sigterm() -> None:
    """On the way out of a distributed run after a failure: torchrun's agent SIGTERMs the survivors of
    a dead peer, which must not cut the one line that says what happened (the process then leaves
    through `leave_process_group`, so nothing else needs the signal)."""
    if _joined_process_group():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


_AFTER_PEER_FAILURE = (
    "not saving (a collective cannot finish without the peer); torchrun --max-restarts restarts the group "
    "from the newest checkpoint, or rerun with the same --out"
)


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _peer_failure(err: Exception) -> str | None:
    if "torch.distributed" not in sys.modules:
        return None
    from moeforge.parallel.process_group import peer_failure

    return peer_failure(err)


def _joined_process_group() -> bool:
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeforge", description="Train and serve dropless Mixture-of-Experts models."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a model (no arguments: the tiny default on the embedded corpus)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_options_help(),
    )
    train.add_argument(
        "--config", help="a TOML file with [model], [model.moe], [train], [data], [parallel], [diloco] tables"
    )
    train.add_argument(
        "--preset", help=f"start from a preset: {', '.join(available_presets())} (default: tiny)"
    )
    train.add_argument(
        "--out", default="runs/tiny", help="run directory; rerunning with it resumes (default: runs/tiny)"
    )
    train.add_argument(
        "--init-from-hf",
        metavar="DIR",
        help="start from a local Hugging Face model (= --train.init-from-hf DIR)",
    )
    train.set_defaults(handler=run_train)

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
        help="torch.compile the decoding step (CUDA: as a CUDA graph); costs ~30-100 s of compilation on a "
        "2-core CPU before the first token, so off by default",
    )
    gen.set_defaults(handler=run_generate)

    ev = commands.add_parser("eval", help="loss and perplexity of a trained model on prepared datasets")
    ev.add_argument(
        "--checkpoint", required=True, help="a run directory (newest checkpoint) or one checkpoint"
    )
    ev.add_argument("data_dirs", nargs="+", metavar="DATA_DIR", help="directories made by `moeforge data prepare`")
    ev.add_argument("--split", choices=("val", "train"), default="val", help="the split scored (default: val)")
    ev.add_argument("--seq-len", type=int, default=0, help="tokens a window (default: the run's train.seq-len)")
    ev.add_argument("--batch-size", type=int, default=8, help="windows a forward (default: 8)")
    ev.add_argument("--max-batches", type=int, default=0, help="batches from the split's start (default 0: all)")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(handler=run_eval)

    bench = commands.add_parser(
        "bench", help="benchmarks; each prints ratios against a baseline timed in the same run"
    )
    benches = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    moe = benches.add_parser(
        "moe",
        parents=[_bench_flags()],
        help="one MoE layer forward+backward vs plain GEMMs, a dense SwiGLU and its experts alone (same FLOPs)",
    )
    moe.add_argument("--backends", default="grouped", help="comma-separated: grouped, loop")
    moe.add_argument("--device", default="cpu")
    moe.add_argument(
        "--shape",
        default="both",
        help="coarse (32 experts of ffn 256, top-4), fine (64 of ffn 128, top-6) or both (default); "
        "--experts/--ffn-dim/--top-k give one shape of their own instead",
    )
    moe.add_argument(
        "--peers", action="store_true", help="also time the peers' MoE layers that are installed (transformers)"
    )
    moe.add_argument(
        "--compile",
        action="store_true",
        help="also time the dense SwiGLU compiled and the layer as --train.compile compiles it (slow to compile)",
    )
    moe.set_defaults(handler=run_bench_moe, tokens=4096, experts=None, ffn_dim=None, top_k=None)
    ep = benches.add_parser(
        "ep",
        parents=[_bench_flags()],
        help="one MoE layer with all experts on every rank (ep=1) vs spread over ep ranks: dispatch / experts / "
        "combine times and off-node traffic, on spawned gloo processes (or the ranks of a torchrun launch)",
    )
    ep.add_argument("--ep", type=int, default=2, help="expert-parallel ranks (processes)")
    ep.add_argument(
        "--ep-nodes", type=int, default=0, help="nodes the ranks are split into; 0 = one per rank"
    )
    ep.add_argument(
        "--topk-nodes", type=int, default=0, help="M, nodes a token's experts may come from; 0 = half"
    )
    ep.set_defaults(handler=run_bench_ep, tokens=2048)
    diloco = benches.add_parser(
        "diloco",
        help="data parallelism vs DiLoCo vs Streaming DiLoCo (fp32, FP4): validation loss, bytes exchanged and "
        "the bandwidth each needs, training the same model on the same tokens on 2 spawned gloo processes "
        "(or a torchrun launch of 2); --section.field VALUE options apply to every method",
    )
    diloco.add_argument("--preset", default="tiny", help=f"{', '.join(available_presets())} (default: tiny)")
    diloco.add_argument("--steps", type=int, default=300, help="steps of every method (default: 300)")
    diloco.add_argument("--sync-every", type=int, default=20, help="H of (Streaming) DiLoCo (default: 20)")
    diloco.add_argument("--fragments", type=int, default=2, help="P of Streaming DiLoCo (default: 2)")
    diloco.add_argument("--overlap-steps", type=int, default=1, help="tau of Streaming DiLoCo (default: 1)")
    diloco.add_argument("--mix", type=float, default=0.5, help="alpha of Streaming DiLoCo (default: 0.5)")
    diloco.add_argument(
        "--codecs",
        default="fp4-e3m0",
        help="comma-separated quantised Streaming DiLoCo rows besides fp32: fp4-e3m0, fp4-e2m1, fp8, bf16 "
        "(default: fp4-e3m0)",
    )
    diloco.add_argument("--eval-every", type=int, default=50, help="steps between validations (default: 50)")
    diloco.add_argument(
        "--utilisation", type=float, default=0.9, help="compute share the bandwidths allow (default: 0.9)"
    )
    diloco.add_argument(
        "--ref-params", type=float, default=1e9, help="parameters of the reference model (default: 1e9)"
    )
    diloco.add_argument(
        "--ref-step-s", type=float, default=1.0, help="assumed step time of the reference model (default: 1)"
    )
    diloco.add_argument("--out", help="where the runs go (default: a temporary directory, removed after)")
    diloco.add_argument("--plot", metavar="PNG", help="write the loss-vs-tokens plot here")
    diloco.add_argument("--json", action="store_true")
    diloco.set_defaults(handler=run_bench_diloco)
    pp_bench = benches.add_parser(
        "pp",
        help="each pipeline schedule (1f1b, interleaved-1f1b, zbv, dualpipev) on pp (x ep) spawned gloo processes: "
        "step time, idle fraction per rank from timestamps next to the formula's bubble, saved activations, "
        "and efficiency against one process without pipeline; pp > CPUs measures the OS scheduler too",
    )
    pp_bench.add_argument("--pp", type=int, default=2, help="pipeline ranks (default: 2)")
    pp_bench.add_argument(
        "--ep",
        type=int,
        default=1,
        help="expert-parallel ranks per pipeline rank, pp x ep processes; > 1 adds the exposed expert "
        "all-to-all time per rank, and dualpipev runs with its F&B overlap off and on (default: 1)",
    )
    pp_bench.add_argument(
        "--schedules",
        default="1f1b,interleaved-1f1b,zbv,dualpipev",
        help="comma-separated: 1f1b, interleaved-1f1b, zbv, dualpipev (default: all)",
    )
    pp_bench.add_argument("--microbatches", type=int, default=8, help="micro-batches per step (default: 8)")
    pp_bench.add_argument(
        "--micro-batch-size", type=int, default=2, help="sequences per micro-batch (default: 2)"
    )
    pp_bench.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    pp_bench.add_argument("--dim", type=int, default=256, help="model width (default: 256)")
    pp_bench.add_argument("--layers", type=int, default=8, help="transformer blocks (default: 8)")
    pp_bench.add_argument("--repeats", type=int, default=4, help="timed steps per schedule (default: 4)")
    pp_bench.add_argument(
        "--warmup", type=int, default=1, help="untimed steps before them, after one memory step (default: 1)"
    )
    pp_bench.add_argument("--json", action="store_true")
    pp_bench.set_defaults(handler=run_bench_pp)
    train_bench = benches.add_parser(
        "train",
        help="training steps of a preset (with --model.* / --train.* overrides) eager, compiled and with "
        "activation checkpointing, each in a fresh process: tokens/s, peak memory (RSS on CPU, max allocated "
        "on CUDA) and MFU (CPU: against a GEMM measured in the same run); --peers: vs transformers",
    )
    train_bench.add_argument("--preset", help=f"{', '.join(available_presets())} (default: tiny)")
    train_bench.add_argument(
        "--variants",
        default="eager,compile,ac-experts,ac-block",
        help="comma-separated: eager, compile, ac-experts, ac-block, compile+ac-block, bf16, compile+bf16 "
        "(default: the first four)",
    )
    train_bench.add_argument("--steps", type=int, default=4, help="timed steps per run (default: 4)")
    train_bench.add_argument(
        "--warmup", type=int, default=2, help="untimed steps before them, compilation included (default: 2)"
    )
    train_bench.add_argument(
        "--repeats", type=int, default=2, help="interleaved rounds of fresh processes (default: 2)"
    )
    train_bench.add_argument(
        "--peers",
        action="store_true",
        help="also a 4-layer DeepSeek-V3-like and Qwen3-MoE-like model built with transformers (batch 8 x 256): "
        "moeforge (eager, compiled) vs transformers' eager training step on the same weights",
    )
    train_bench.add_argument("--json", action="store_true")
    train_bench.set_defaults(handler=run_bench_train)
    plan_bench = benches.add_parser(
        "plan",
        help="the planner's step time vs real training steps of the tiny presets under several layouts, on "
        "a cluster measured on this CPU (GEMM FLOP/s, copy bandwidth, gloo bandwidth and latency)",
    )
    plan_bench.add_argument(
        "--presets", default="tiny,deepseek-v3-tiny", help="comma-separated model presets"
    )
    plan_bench.add_argument(
        "--layouts",
        default="single,fsdp2,ep2,fsdp4-ep2,hsdp2x2",
        help="comma-separated: single (1 process), fsdp2, ep2 (2 processes), fsdp4-ep2, hsdp2x2 (4 processes)",
    )
    plan_bench.add_argument("--steps", type=int, default=4, help="timed training steps per layout")
    plan_bench.add_argument("--warmup", type=int, default=2, help="untimed training steps before them")
    plan_bench.add_argument(
        "--clusters-out", metavar="DIR", help="also write each measured cluster as DIR/cpu-P.toml"
    )
    plan_bench.add_argument("--json", action="store_true")
    plan_bench.set_defaults(handler=run_bench_plan)
    decode_bench = benches.add_parser(
        "decode",
        help="greedy decoding, batch 1, of small DeepSeek-V3-like and Qwen3-MoE-like models made with "
        "transformers and imported: moeforge eager and compiled vs transformers' generate on the same "
        "weights, tokens compared, bandwidth vs this machine's copy bandwidth (needs moeforge[hf])",
    )
    decode_bench.add_argument(
        "--models", default="deepseek-v3,qwen3-moe", help="comma-separated: deepseek-v3, qwen3-moe"
    )
    decode_bench.add_argument("--new-tokens", type=int, default=128, help="tokens generated (default: 128)")
    decode_bench.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default: 16)")
    decode_bench.add_argument("--repeats", type=int, default=5, help="timed runs of each case (default: 5)")
    decode_bench.add_argument(
        "--threads", type=int, default=1, help="torch threads, the same for every case (default: 1)"
    )
    decode_bench.add_argument("--no-compile", action="store_true", help="skip the compiled case")
    decode_bench.add_argument("--json", action="store_true")
    decode_bench.set_defaults(handler=run_bench_decode)

    data_bench = benches.add_parser(
        "data",
        help="the data path: `data prepare` vs the tokenizer's encode_batch, the loader vs what a training step "
        "consumes, time to the first step and peak RSS on a small and a large prepared corpus (generated)",
    )
    data_bench.add_argument("--size-mb", type=float, default=4.0, help="corpus of the prepare and loader figures (default: 4)")
    data_bench.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json (default: byte)")
    data_bench.add_argument("--workers", type=int, default=1, help="prepare's worker processes (default: 1)")
    data_bench.add_argument("--chunk-mb", type=float, default=1.0, help="prepare's chunk, the baseline's batch (default: 1)")
    data_bench.add_argument("--repeats", type=int, default=3, help="rounds of every measurement (default: 3)")
    data_bench.add_argument("--loader-batches", type=int, default=200, help="timed next_batch calls a round (default: 200)")
    data_bench.add_argument("--train-steps", type=int, default=3, help="timed training steps a round (default: 3)")
    data_bench.add_argument(
        "--startup-mb", default="2,50", help="SMALL,LARGE corpora of the start-up figures; 'none' skips them (default: 2,50)"
    )
    data_bench.add_argument("--two-processes", action="store_true", help="also the start-up on 2 gloo processes")
    data_bench.add_argument("--work-dir", default="", help="where corpora are written (default: the temporary directory)")
    data_bench.add_argument("--json", action="store_true")
    data_bench.set_defaults(handler=run_bench_data)

    convert = commands.add_parser("convert", help="Hugging Face safetensors <-> moeforge checkpoints")
    source = convert.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--from-hf", metavar="DIR", help="a local Hugging Face model directory (config.json, *.safetensors)"
    )
    source.add_argument(
        "--to-hf", metavar="CKPT", help="a moeforge run directory (newest checkpoint) or one checkpoint"
    )
    convert.add_argument(
        "--out", required=True, help="the new run directory (--from-hf) or HF directory (--to-hf)"
    )
    convert.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        help="--to-hf precision (default: as imported, else fp32)",
    )
    convert.set_defaults(handler=run_convert)

    checkpoint = commands.add_parser("checkpoint", help="inspect a run's checkpoints")
    checkpoint_commands = checkpoint.add_subparsers(
        dest="checkpoint_command", metavar="ACTION", required=True
    )
    verify = checkpoint_commands.add_parser(
        "verify", help="check every checkpoint of a run against the sizes and SHA-256 sums it recorded"
    )
    verify.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or one checkpoint)")
    verify.set_defaults(handler=run_checkpoint_verify)

    data = commands.add_parser("data", help="prepare text into memory-mapped token datasets")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prepare = data_commands.add_parser(
        "prepare",
        help="tokenize .txt/.jsonl/.jsonl.gz/.jsonl.zst/.parquet files into Megatron-LM indexed datasets",
    )
    prepare.add_argument("inputs", nargs="+", metavar="INPUT", help="files or directories of documents")
    prepare.add_argument("--out", required=True, help="the prepared dataset's directory")
    prepare.add_argument("--tokenizer", default="byte", help="'byte' (default) or a tokenizer.json")
    prepare.add_argument("--text-field", default="text", help="the text's key or column in .jsonl/.parquet")
    prepare.add_argument(
        "--val-fraction", type=float, default=0.0, help="share of documents held out (by their text's hash)"
    )
    prepare.add_argument("--val", nargs="+", default=[], metavar="INPUT", help="inputs held out whole instead")
    prepare.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    prepare.add_argument("--chunk-mb", type=float, default=16.0, help="input read per task (default 16)")
    prepare.set_defaults(handler=run_data_prepare)

    plan = commands.add_parser(
        "plan",
        help="memory, traffic, pipeline bubble and step time of a layout on a cluster; --search ranks layouts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_plan_options_help(),
    )
    plan.add_argument("--config", help="a run's TOML file (model, train, parallel, diloco)")
    plan.add_argument("--preset", help=f"a model preset: {', '.join(available_presets())} (default: tiny)")
    plan.add_argument("--from-hf", metavar="DIR", help="take the model from a Hugging Face config.json")
    plan.add_argument(
        "--cluster", required=True, help="a cluster preset (h100, h200, h800, b200) or a TOML file"
    )
    plan.add_argument("--gpus", type=int, required=True, help="GPUs in the run")
    plan.add_argument("--search", action="store_true", help="rank every valid layout that fits")
    plan.add_argument(
        "--top",
        type=int,
        default=10,
        help="--search: pipeline shapes shown, the fastest layout of each (default: 10)",
    )
    plan.add_argument("--json", action="store_true", help="print JSON")
    plan.set_defaults(handler=run_plan)

    report = commands.add_parser(
        "report", help="PNG plots of a run: losses, expert load heatmaps, max violation"
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory with metrics.jsonl")
    report.add_argument("--out", help="where the PNGs go (default: RUN_DIR/report)")
    report.set_defaults(handler=run_report)
    return parser


def _bench_flags() -> argparse.ArgumentParser:
    """The flags `bench moe` and `bench ep` share, as a parent parser; a new one per bench, since
    argparse shares a parent's actions and each bench sets its own --tokens default."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--dim", type=int, default=512)
    flags.add_argument("--ffn-dim", type=int, default=256)
    flags.add_argument("--experts", type=int, default=32)
    flags.add_argument("--top-k", type=int, default=4)
    flags.add_argument("--tokens", type=int, help="tokens through the layer (bench ep: per rank)")
    flags.add_argument("--repeats", type=int, default=5)
    flags.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    flags.add_argument("--json", action="store_true")
    return flags


def _options_help() -> str:
    lines = ["configuration options (--section.field-name VALUE; default shown is before any preset):"]
    for option in iter_options():
        allowed = f" (allowed: {format_choices(option.choices)})" if option.choices else ""
        lines.append(f"  --{option.flag} {option.default!r}{allowed}\n      {option.doc}")
    return "\n".join(lines)


def _plan_options_help() -> str:
    from moeforge.plan import Cluster, Layout

    lines = [
        "layout options (--layout.field-name VALUE; defaults come from the run's parallel.* and diloco.*):"
    ]
    for prefix, obj in (("layout.", Layout()), ("cluster.", Cluster())):
        if prefix == "cluster.":
            lines.append("cluster options (--cluster.field-name VALUE, over the preset's values):")
        for option in iter_options(obj, prefix):
            allowed = f" (allowed: {format_choices(option.choices)})" if option.choices else ""
            lines.append(f"  --{option.flag} {option.default!r}{allowed}\n      {option.doc}")
    lines.append("model and batch: --model.*, --train.global-batch-size, --train.seq-len, as for `train`")
    return "\n".join(lines)


def parse_overrides(rest: list[str]) -> dict[str, str]:
    """['--train.steps', '200', '--model.moe.top-k=4'] -> {'train.steps': '200', 'model.moe.top-k': '4'}."""
    overrides: dict[str, str] = {}
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--") or "." not in token.split("=", 1)[0]:
            raise ConfigError(f"{token}: unrecognised argument; options look like --section.field-name VALUE")
        if "=" in token:
            key, value = token[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest):
                raise ConfigError(f"{token}: missing a value")
            key, value = token[2:], rest[i + 1]
            i += 2
        overrides[key] = value
    return overrides


def run_train(args: argparse.Namespace, rest: list[str]) -> int:
    from moeforge.interop import apply_hf_model, hf_weights_loader
    from moeforge.run_plots import report_after_training
    from moeforge.train.trainer import Trainer

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    overrides = parse_overrides(rest)
    if args.init_from_hf:
        overrides["train.init-from-hf"] = args.init_from_hf
    cfg = load_config(args.preset, args.config, overrides, world_size=world_size, apply_init_from=apply_hf_model)
    out = _output_dir(args.out, "--out")
    trainer = Trainer(cfg, out, init_weights=hf_weights_loader(cfg) if cfg.train.init_from_hf else None)
    result = trainer.fit()
    if not trainer.is_main:  # under torchrun the summary and the report come once, from rank 0
        return 0
    if cfg.train.report and not result.interrupted:  # a signalled run exits promptly
        report_after_training(out)
    state = "interrupted" if result.interrupted else "done"
    val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(f"{state} at step {result.step}: loss {result.final_loss:.4f}{val}; checkpoint {result.checkpoint}")
    if result.exchange is not None:
        sent, plain = result.exchange["bytes_per_replica"], result.exchange["data_parallel_bytes_per_replica"]
        fewer = f" ({plain / sent:,.0f}x fewer)" if sent else ""
        print(
            f"diloco: {sent / 1e6:,.1f} MB sent per replica; data parallelism would have sent "
            f"{plain / 1e6:,.1f} MB for these steps{fewer}"
        )
    return 0


def run_generate(args: argparse.Namespace, rest: list[str]) -> int:
    _reject_extra(rest)
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


def run_eval(args: argparse.Namespace, rest: list[str]) -> int:
    _reject_extra(rest)
    from moeforge.infer import load_model
    from moeforge.infer.evaluate import check_data_dir, check_eval_flags, check_seq_len, evaluate, open_eval_split
    from moeforge.infer.generate import generation_device
    from moeforge.plan.memory_budget import check_checkpoint_fits
    from moeforge.run import tokenizer_name_for_run

    # flags and directories first, then the checkpoint, then every dataset before any is scored
    check_eval_flags(args.seq_len, args.batch_size, args.max_batches)
    device = generation_device(args.device)
    roots = [check_data_dir(path) for path in args.data_dirs]
    check_checkpoint_fits(args.checkpoint, device)
    loaded = load_model(args.checkpoint, device)
    seq_len = args.seq_len or loaded.config.train.seq_len
    check_seq_len(seq_len, loaded.config.model.max_seq_len)
    tokenizer = tokenizer_name_for_run(loaded.checkpoint.parent.parent)
    vocab_size = loaded.config.model.vocab_size
    splits = [open_eval_split(root, args.split, tokenizer, vocab_size, seq_len) for root in roots]
    datasets = []
    for path, tokens in zip(args.data_dirs, splits, strict=True):
        result = evaluate(loaded.model, tokens, seq_len, args.batch_size, args.max_batches, device)
        figures = {"loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens}
        datasets.append({"path": path, **figures, "windows": result.windows})
        if not args.json:
            print(
                f"{path} {args.split}: loss {result.loss:.4f} nats/token, perplexity {result.perplexity:.2f} "
                f"over {result.tokens:,} tokens ({result.windows:,} windows of {seq_len})",
                flush=True,
            )
    if args.json:
        checkpoint = {"checkpoint": str(loaded.checkpoint), "step": loaded.step}
        print(json.dumps(checkpoint | {"split": args.split, "seq_len": seq_len, "datasets": datasets}))
    return 0


def _speculative_report(args, loaded, prompt, sampling, plain) -> dict:
    """The speculative run's text and figures, compared with the plain run `plain` of the same request."""
    from moeforge.infer.speculative import comparison_with_plain, speculative_generate

    eos = loaded.tokenizer.eos_id
    spec = speculative_generate(loaded.model, prompt, args.max_new_tokens, sampling, args.seed, eos, args.compile)
    figures = comparison_with_plain(spec, plain, greedy=sampling.temperature == 0)
    return {"text": loaded.tokenizer.decode(spec.new_tokens), "new_tokens": len(spec.new_tokens), **figures}


def run_bench_moe(args: argparse.Namespace, rest: list[str]) -> int:
    _reject_extra(rest)
    from moeforge.bench.moe import bench_shapes, format_table, run_moe_bench

    results = [
        run_moe_bench(
            dim=args.dim,
            **shape,
            tokens=args.tokens,
            backends=tuple(b for b in args.backends.split(",") if b),
            repeats=args.repeats,
            device=args.device,
            dtype=args.dtype,
            peers=args.peers,
            compile=args.compile,
        )
        for shape in bench_shapes(args.shape, args.ffn_dim, args.experts, args.top_k)
    ]
    print(json.dumps(results) if args.json else "\n\n".join(map(format_table, results)))
    return 0


def run_bench_ep(args: argparse.Namespace, rest: list[str]) -> int:
    _reject_extra(rest)
    from moeforge.bench.ep import EpBenchSettings, format_table, run_ep_bench

    settings = EpBenchSettings(
        ep=args.ep,
        ep_nodes=args.ep_nodes,
        topk_nodes=args.topk_nodes,
        dim=args.dim,
        ffn_dim=args.ffn_dim,
        n_experts=args.experts,
        top_k=args.top_k,
        tokens=args.tokens,
        repeats=args.repeats,
        dtype=args.dtype,
    )
    result = run_ep_bench(settings)
    if result is not None:
        print(json.dumps(result) if args.json else format_table(result))
    return 0


def run_bench_diloco(args: argparse.Namespace, rest: list[str]) -> int:
    from moeforge.bench.diloco import DilocoBenchSettings, format_table, run_diloco_bench, write_plot

    settings = DilocoBenchSettings(
        preset=args.preset,
        steps=args.steps,
        sync_every=args.sync_every,
        fragments=args.fragments,
        overlap_steps=args.overlap_steps,
        mix=args.mix,
        codecs=tuple(c for c in args.codecs.split(",") if c),
        eval_every=args.eval_every,
        utilisation=args.utilisation,
        ref_params=args.ref_params,
        ref_step_s=args.ref_step_s,
        overrides=tuple(parse_overrides(rest).items()),
    )
    out = _output_dir(args.out, "--out") if args.out else None
    result = run_diloco_bench(settings, out)
    if result is None:
        return 0
    print(json.dumps(result) if args.json else format_table(result))
    if args.plot:
        print(f"wrote {write_plot(result, args.plot)}", file=sys.stderr)
    return 0


def run_bench_plan(args: argparse.Namespace, rest: list[str]) -> int:
    _reject_extra(rest)
    from moeforge.bench.machine_cluster import cluster_toml
    from moeforge.bench.plan import PlanBenchSettings, format_table, run_plan_bench
    from moeforge.plan import Cluster

    settings = PlanBenchSettings(
        presets=tuple(p for p in args.presets.split(",") if p),
        layouts=tuple(name for name in args.layouts.split(",") if name),
        steps=args.steps,
        warmup=args.warmup,
    )
    out = _output_dir(args.clusters_out, "--clusters-out") if args.clusters_out else None
    result = run_plan_bench(settings)
    if out is not None:
        for name, fields in result["clusters"].items():
            (out / f"{name}.toml").write_text(cluster_toml(Cluster(**fields)))
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def run_bench_train(args: argparse.Namespace, rest: list[str]) -> int:
    from moeforge.bench.train import TrainBenchSettings, format_table, run_train_bench

    settings = TrainBenchSettings(
        preset=args.preset,
        overrides=tuple(parse_overrides(rest).items()),
        variants=tuple(v for v in args.variants.split(",") if v),
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        peers=args.peers,
    )
    result = run_train_bench(settings)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def run_bench_data(args: argparse.Namespace, rest: list[str]) -> int:
    from moeforge.bench.data import DataBenchSettings, format_table, run_data_bench

    settings = DataBenchSettings(
        size_mb=args.size_mb,
        tokenizer=args.tokenizer,
        workers=args.workers,
        chunk_mb=args.chunk_mb,
        repeats=args.repeats,
        loader_batches=args.loader_batches,
        train_steps=args.train_steps,
        startup_mb=_numbers(args.startup_mb, "--startup-mb"),
        processes=(1, 2) if args.two_processes else (1,),
        overrides=tuple(parse_overrides(rest).items()),
        work_dir=args.work_dir,
    )
    result = run_data_bench(settings)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def _numbers(text: str, flag: str) -> tuple[float, ...]:
    """'2,50' -> (2.0, 50.0); 'none' -> ()."""
    if text == "none":
        return ()
    try:
        return tuple(float(item) for item in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag}: got {text!r}; allowed: comma-separated numbers, or 'none'") from None


def run_bench_pp(args: argparse.Namespace, rest: list[str]) -> int:
    _reject_extra(rest)
    from moeforge.bench.pp import PpBenchSettings, run_pp_bench
    from moeforge.bench.pp_results import format_table

    settings = PpBenchSettings(
        pp=args.pp,
        ep=args.ep,
        schedules=tuple(s for s in args.schedules.split(",") if s),
        microbatches=args.microbatches,
        micro_batch_size=args.micro_batch_size,
        seq_len=args.seq_len,
        dim=args.dim,
        layers=args.layers,
        repeats=args.repeats,
        warmup=args.warmup,
    )
    result = run_pp_bench(settings)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def run_bench_decode(args: argparse.Namespace, rest: list[str]) -> int:
    _reject_extra(rest)
    from moeforge.bench.decode import DecodeBenchSettings, format_table, run_decode_bench

    settings = DecodeBenchSettings(
        models=tuple(m for m in args.models.split(",") if m),
        new_tokens=args.new_tokens,
        prompt_len=args.prompt_len,
        repeats=args.repeats,
        threads=args.threads,
        compile=not args.no_compile,
    )
    result = run_decode_bench(settings)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def run_convert(args: argparse.Namespace, rest: list[str]) -> int:
    _reject_extra(rest)
    import torch

    from moeforge.interop.convert import checkpoint_to_hf, hf_to_checkpoint
    from moeforge.plan.memory_budget import check_checkpoint_fits

    if args.from_hf:
        if args.dtype:
            raise ConfigError("--dtype: applies to --to-hf only (imported weights are kept in fp32)")
        checkpoint = hf_to_checkpoint(args.from_hf, _output_dir(args.out, "--out"))
        print(f"wrote {checkpoint}; try: moeforge generate --checkpoint {args.out}")
        return 0
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    check_checkpoint_fits(args.to_hf, "cpu")  # the model is rebuilt whole on the host to be written
    path = checkpoint_to_hf(args.to_hf, _output_dir(args.out, "--out"), dtypes.get(args.dtype))
    print(f"wrote Hugging Face checkpoint {path}")
    return 0


def run_plan(args: argparse.Namespace, rest: list[str]) -> int:
    from moeforge.interop import apply_hf_model
    from moeforge.plan import TrainingShape, layout_from_config, load_cluster, plan_layout, search_layouts
    from moeforge.plan.summary import format_plan, format_search
    from moeforge.plan.search import best_per_shape, candidate_layouts

    if args.gpus < 1:
        raise ConfigError(f"--gpus: got {args.gpus}; allowed: an integer >= 1")
    overrides = parse_overrides(rest)
    layout_flags = _take_section(overrides, "layout")
    cluster = load_cluster(args.cluster, _take_section(overrides, "cluster"))
    if args.from_hf:
        overrides["train.init-from-hf"] = args.from_hf
    pp = 1 if args.search else _pipeline_degree(layout_flags, args.gpus)
    cfg = load_config(
        args.preset, args.config, overrides, world_size=args.gpus // pp, apply_init_from=apply_hf_model
    )
    layout = layout_from_config(cfg, layout_flags)
    shape = TrainingShape(cfg.train.global_batch_size, cfg.train.seq_len)
    if args.search:
        plans = search_layouts(cfg.model, layout, cluster, shape, args.gpus)
        shown = best_per_shape(plans, args.top)
        if args.json:
            print(json.dumps([{"rank": rank, **plan.to_dict()} for rank, plan in shown]))
        else:
            considered = sum(
                1 for _ in candidate_layouts(cfg.model, layout, args.gpus, cluster.gpus_per_node)
            )
            print(format_search(shown, len(plans), considered))
        return 0
    layout.validate(args.gpus, cluster.gpus_per_node)
    plan = plan_layout(cfg.model, layout, cluster, shape)
    print(json.dumps(plan.to_dict()) if args.json else format_plan(plan))
    return 0


def _take_section(overrides: dict[str, str], section: str) -> dict[str, str]:
    """Remove the `section.*` overrides from `overrides` and return them without the prefix."""
    taken = {
        key.split(".", 1)[1]: overrides.pop(key) for key in list(overrides) if key.startswith(f"{section}.")
    }
    return taken


def _pipeline_degree(layout_flags: dict[str, str], gpus: int) -> int:
    """--layout.pp, checked to divide the GPUs (the run config's parallel.* lays out the rest)."""
    text = layout_flags.get("pp", "1")
    if not text.isdigit() or int(text) < 1 or gpus % int(text):
        raise ConfigError(f"--layout.pp: got {text!r}; allowed: an integer >= 1 dividing --gpus={gpus}")
    return int(text)


def run_report(args: argparse.Namespace, rest: list[str]) -> int:
    _reject_extra(rest)
    from moeforge.run_plots import write_report

    out = _output_dir(args.out, "--out") if args.out else None
    for path in write_report(args.run_dir, out):
        print(path)
    return 0


def run_data_prepare(args: argparse.Namespace, rest: list[str]) -> int:
    _reject_extra(rest)
    from moeforge.data.prepare import PrepareOptions, prepare

    options = PrepareOptions(
        tuple(args.inputs),
        Path(args.out),
        args.tokenizer,
        args.text_field,
        args.val_fraction,
        tuple(args.val),
        args.workers,
        int(args.chunk_mb * 2**20),
    )
    manifest = prepare(options)
    counts = ", ".join(
        f"{split} {info['documents']:,} documents / {info['tokens']:,} tokens" for split, info in manifest["splits"].items()
    )
    print(f"prepared {args.out}: {counts}")
    return 0


def run_checkpoint_verify(args: argparse.Namespace, rest: list[str]) -> int:
    _reject_extra(rest)
    from moeforge import checkpoint as ckpt

    path = Path(args.run_dir)
    if not path.is_dir():
        raise ConfigError(f"RUN_DIR: {str(path)!r} is not a directory")
    checkpoints = ckpt.checkpoints_in(path)
    if not checkpoints:
        raise ConfigError(f"RUN_DIR: no complete checkpoint in {str(path)!r}")
    good = []
    for checkpoint in checkpoints:  # the checks a resume makes (newest_good_checkpoint), without its renames
        problems = ckpt.verify_checkpoint(checkpoint)
        good += [] if problems else [checkpoint]
        print(f"{checkpoint.name}: {_verdict(checkpoint, problems)}")
        for problem in problems[1:]:
            print(f"{' ' * len(checkpoint.name)}  {problem}")
    for aside in sorted(ckpt.checkpoint_dir(path).glob(f"*{ckpt.CORRUPT_SUFFIX}*")):
        print(f"{aside.name}: set aside by an earlier resume (not used)")
    if not good:
        print("a resume finds no good checkpoint and starts from step 0")
    elif len(checkpoints) > 1:
        print(f"a resume continues from {good[-1].name}")
    print(f"{len(good)} of {len(checkpoints)} checkpoints good")
    return 0 if len(good) == len(checkpoints) else 1


def _verdict(checkpoint: Path, problems: list[str]) -> str:
    from moeforge import checkpoint as ckpt

    if problems:
        return f"BAD: {problems[0]}"
    meta = ckpt.read_meta(checkpoint)
    unhashed = "" if meta.format >= 2 else f", {ckpt.META_FILE} unhashed (written by an older moeforge)"
    if meta.files is None:
        return f"no checksums recorded (written by an older moeforge); not verified{unhashed}"
    size = sum(entry["bytes"] for entry in meta.files.values())
    return f"ok ({len(meta.files)} files, {size / 1e6:.1f} MB, SHA-256 verified{unhashed})"


def _output_dir(path: str, flag: str) -> Path:
    """`path` created if missing; a one-line error naming `flag` when it cannot be."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{flag}: cannot create the directory {path!r}: {err.strerror or err}") from None
    return out


def _reject_extra(rest: list[str]) -> None:
    if rest:
        raise ConfigError(f"{rest[0]}: unrecognised argument")


if __name__ == "__main__":
    sys.exit(main())
