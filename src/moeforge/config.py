"""Every knob of moeforge, defined, documented and validated once.

A config is a tree of dataclasses. Each field's help text is the string literal right after it
(read from this file's source by `field_docs`), so the docstring *is* the `--help` text. Values come,
in increasing priority, from the dataclass defaults, a preset (`presets/NAME.toml`), a user's TOML
file and dotted command-line overrides spelled `--section.field-name VALUE`
(e.g. `--model.moe.n-experts 16`, `--train.steps 200`).

A field whose value is one of a fixed set of strings is typed `Literal[...]`: the type alone gives
its parsing, its allowed values in `--help` and its validation (`_check_choices`).

Mistakes are reported as one-line `ConfigError`s naming the field and what it accepts.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import tomllib
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, NamedTuple

from moeforge.errors import MoeforgeError

PRESETS_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "tiny"


class ConfigError(MoeforgeError, ValueError):
    """A user mistake in a config value: one line naming the field and what is allowed."""


@dataclass
class MoEConfig:
    """One Mixture-of-Experts layer: router, routed experts, shared experts and load balancing."""

    dim: int = 0
    """model width; 0 inside a ModelConfig, which fills it from model.dim"""
    n_experts: int = 8
    """routed experts per MoE layer"""
    top_k: int = 2
    """routed experts chosen per token"""
    expert_ffn_dim: int = 128
    """hidden width of each routed (and shared) SwiGLU expert"""
    n_shared_experts: int = 1
    """always-on experts every token passes through (DeepSeek: 1)"""
    score_func: Literal["sigmoid", "softmax"] = "sigmoid"
    """router score: 'sigmoid' (DeepSeek-V3) or 'softmax' (Mixtral, Qwen)"""
    route_norm: bool = True
    """normalise the selected gates to sum to 1 (with softmax this equals top-k-then-softmax)"""
    route_scale: float = 1.0
    """multiplier on the gates after normalisation (DeepSeek-V3: 2.5)"""
    n_groups: int = 1
    """expert groups for group-limited routing (DeepSeek-V3: 8, one per node); 1 = off"""
    topk_groups: int = 1
    """groups a token may choose experts from (DeepSeek-V3: 4)"""
    jitter: float = 0.0
    """multiplicative uniform noise on router inputs while training (MegaBlocks); 0 = off"""
    backend: Literal["grouped", "loop"] = "grouped"
    """expert compute: 'grouped' (one grouped GEMM, torch._grouped_mm) or 'loop' (per-expert matmuls)"""
    bias_update_rate: float = 1e-3
    """gamma of aux-loss-free balancing: b_i += gamma*sign(mean_load - load_i) per step; 0 = off"""
    seq_aux_coef: float = 1e-4
    """alpha of the complementary sequence-wise balance loss (DeepSeek-V3 eq. 17-20); 0 = off"""
    aux_coef: float = 0.0
    """alpha of the classic batch-wise aux loss (Switch/GShard, ~1e-2); 0 = off"""
    z_loss_coef: float = 0.0
    """router z-loss coefficient (ST-MoE, 1e-3); 0 = off"""

    def validate(self, prefix: str = "moe") -> None:
        _check_choices(self, prefix)
        _check(self.dim >= 0, f"{prefix}.dim", self.dim, "an integer >= 0")
        _check(self.n_experts >= 1, f"{prefix}.n-experts", self.n_experts, "an integer >= 1")
        _check(
            1 <= self.top_k <= self.n_experts,
            f"{prefix}.top-k",
            self.top_k,
            f"an integer in [1, n-experts={self.n_experts}]",
        )
        _check(self.expert_ffn_dim >= 1, f"{prefix}.expert-ffn-dim", self.expert_ffn_dim, "an integer >= 1")
        _check(
            self.n_shared_experts >= 0, f"{prefix}.n-shared-experts", self.n_shared_experts, "an integer >= 0"
        )
        _check(self.route_scale > 0, f"{prefix}.route-scale", self.route_scale, "a number > 0")
        _check(
            self.n_groups >= 1 and self.n_experts % self.n_groups == 0,
            f"{prefix}.n-groups",
            self.n_groups,
            f"a divisor of n-experts={self.n_experts}",
        )
        _check(
            1 <= self.topk_groups <= self.n_groups,
            f"{prefix}.topk-groups",
            self.topk_groups,
            f"an integer in [1, n-groups={self.n_groups}]",
        )
        experts_reachable = self.topk_groups * (self.n_experts // self.n_groups)
        _check(
            self.top_k <= experts_reachable,
            f"{prefix}.top-k",
            self.top_k,
            f"at most topk-groups*experts-per-group={experts_reachable}",
        )
        if self.n_groups > 1:
            per_group = self.n_experts // self.n_groups
            _check(
                per_group >= 2, f"{prefix}.n-groups", self.n_groups, "a value leaving >= 2 experts per group"
            )
        for name in ("jitter", "bias_update_rate", "seq_aux_coef", "aux_coef", "z_loss_coef"):
            value = getattr(self, name)
            _check(value >= 0, f"{prefix}.{_flag(name)}", value, "a number >= 0")
        _check(self.jitter < 1, f"{prefix}.jitter", self.jitter, "a number in [0, 1)")


@dataclass
class ModelConfig:
    """A decoder-only transformer: dense SwiGLU blocks first, MoE blocks after."""

    vocab_size: int = 256
    """tokens in the vocabulary (256 for the byte tokenizer; set from tokenizer.json otherwise)"""
    dim: int = 128
    """model width d_model"""
    n_layers: int = 4
    """transformer blocks"""
    n_dense_layers: int = 1
    """leading blocks with a dense SwiGLU MLP instead of MoE (DeepSeek-V3: 3)"""
    n_heads: int = 4
    """attention query heads"""
    n_kv_heads: int = 2
    """key/value heads for grouped-query attention (divides n-heads); 'mla': the GQA point of the KV-cache report"""
    head_dim: int = 0
    """per-head width; 0 = dim / n-heads"""
    ffn_dim: int = 384
    """hidden width of the dense SwiGLU MLP"""
    attention: Literal["gqa", "mla"] = "gqa"
    """attention type: 'gqa' (grouped-query attention via SDPA) or 'mla' (DeepSeek multi-head latent)"""
    qk_norm: bool = False
    """RMSNorm over each query and key head before RoPE (Qwen3); 'gqa' attention only"""
    q_lora_rank: int = 0
    """'mla': rank of the compressed query latent (DeepSeek-V3: 1536); 0 = queries projected directly"""
    kv_lora_rank: int = 64
    """'mla': rank of the compressed key/value latent, what the KV cache stores (DeepSeek-V3: 512)"""
    qk_nope_head_dim: int = 32
    """'mla': per-head query/key width without RoPE, expanded from the latent (DeepSeek-V3: 128)"""
    qk_rope_head_dim: int = 16
    """'mla': per-head query width with RoPE, and of the one shared RoPE key (DeepSeek-V3: 64)"""
    v_head_dim: int = 32
    """'mla': per-head value width (DeepSeek-V3: 128)"""
    max_seq_len: int = 2048
    """longest sequence RoPE and the KV cache are sized for"""
    rope_theta: float = 10000.0
    """RoPE base"""
    norm_eps: float = 1e-6
    """RMSNorm epsilon"""
    tie_embeddings: bool = False
    """share the token embedding with the output head (DeepSeek-V3: untied)"""
    init_std: float = 0.02
    """std of the normal init of weights"""
    mtp_depth: int = 0
    """multi-token prediction modules D, each predicting one token further ahead (DeepSeek-V3: 1); 0 = off"""
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def rope_head_dim(self) -> int:
        """Width RoPE rotates: the decoupled rope part with MLA, the whole head otherwise."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.resolved_head_dim

    def moe_layer_config(self) -> MoEConfig:
        """The MoE config of one layer, with the width filled in from the model."""
        return dataclasses.replace(self.moe, dim=self.dim)

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.n_dense_layers

    def validate(self) -> None:
        _check_choices(self, "model")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            _check(value >= 1, f"model.{_flag(name)}", value, "an integer >= 1")
        _check(
            0 <= self.n_dense_layers <= self.n_layers,
            "model.n-dense-layers",
            self.n_dense_layers,
            f"an integer in [0, n-layers={self.n_layers}]",
        )
        _check(
            self.n_heads % self.n_kv_heads == 0,
            "model.n-kv-heads",
            self.n_kv_heads,
            f"a divisor of n-heads={self.n_heads}",
        )
        if self.head_dim == 0:
            _check(
                self.dim % self.n_heads == 0,
                "model.n-heads",
                self.n_heads,
                f"a divisor of dim={self.dim} (or set model.head-dim)",
            )
        _check(self.resolved_head_dim % 2 == 0, "model.head-dim", self.resolved_head_dim, "an even integer")
        self.validate_mla()
        _check(
            not self.qk_norm or self.attention == "gqa",
            "model.qk-norm",
            self.qk_norm,
            "false unless attention is 'gqa'",
        )
        _check(self.rope_theta > 0, "model.rope-theta", self.rope_theta, "a number > 0")
        _check(self.norm_eps > 0, "model.norm-eps", self.norm_eps, "a number > 0")
        _check(self.init_std > 0, "model.init-std", self.init_std, "a number > 0")
        _check(self.mtp_depth >= 0, "model.mtp-depth", self.mtp_depth, "an integer >= 0")
        _check(
            self.moe.dim in (0, self.dim),
            "model.moe.dim",
            self.moe.dim,
            f"0 or model.dim={self.dim}",
        )
        self.moe.validate("model.moe")

    def validate_mla(self) -> None:
        _check(
            self.q_lora_rank >= 0,
            "model.q-lora-rank",
            self.q_lora_rank,
            "an integer >= 0 (0 = no compression)",
        )
        for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            _check(value >= 1, f"model.{_flag(name)}", value, "an integer >= 1")
        rope = self.qk_rope_head_dim
        _check(rope >= 2 and rope % 2 == 0, "model.qk-rope-head-dim", rope, "an even integer >= 2")


@dataclass
class TrainConfig:
    """The optimisation loop: batch, schedule, logging, checkpoints."""

    steps: int = 300
    """optimizer steps"""
    global_batch_size: int = 16
    """sequences per optimizer step (over all data-parallel ranks)"""
    micro_batch_size: int = 0
    """sequences per forward/backward on one rank; 0 = the whole per-rank batch (no accumulation)"""
    seq_len: int = 128
    """tokens per training sequence"""
    lr: float = 3e-3
    """peak learning rate"""
    min_lr_ratio: float = 0.1
    """final learning rate as a fraction of the peak"""
    warmup_steps: int = 20
    """linear warm-up steps"""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """learning-rate shape after warm-up: 'cosine', 'wsd' (warmup-stable-decay) or 'constant'"""
    decay_fraction: float = 0.2
    """for 'wsd': fraction of steps spent in the final linear decay"""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to norms, biases and embeddings)"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.95
    """AdamW beta2"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this; 0 = off"""
    bias_update_until: float = 1.0
    """fraction of training after which the aux-loss-free bias is frozen (DeepSeek-V3 stops it late)"""
    mtp_lambda: float = 0.3
    """weight lambda of the multi-token prediction loss lambda/D * sum_k CE_k (DeepSeek-V3: 0.3)"""
    mtp_lambda_late: float = 0.1
    """lambda after train.mtp-lambda-switch (DeepSeek-V3: 0.1 for the last third of its tokens)"""
    mtp_lambda_switch: float = 0.7
    """fraction of training after which lambda drops from mtp-lambda to mtp-lambda-late"""
    seed: int = 0
    """seed for weights, data order and router jitter"""
    init_from_hf: str = ""
    """a Hugging Face model directory to start from; its model and tokenizer replace the preset's; '' = off"""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """compute precision: 'fp32', 'bf16' (autocast) or 'auto' (bf16 on CUDA, fp32 on CPU)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where to train; 'auto' = CUDA when available, else the CPU"""
    log_every: int = 10
    """steps between metrics.jsonl / TensorBoard records"""
    eval_every: int = 100
    """steps between validation-loss evaluations; 0 = only at the end"""
    eval_batches: int = 4
    """batches of the held-out split per evaluation"""
    checkpoint_every: int = 100
    """steps between checkpoints (one is also written at the end, and on SIGTERM/SIGINT)"""
    keep_checkpoints: int = 2
    """newest checkpoints kept on disk"""
    progress: bool = True
    """show a progress bar"""
    report: bool = True
    """write the PNG report (loss curves, expert load; `moeforge report`) to OUT/report at the end"""

    def validate(self) -> None:
        _check_choices(self, "train")
        for name in (
            "steps",
            "global_batch_size",
            "seq_len",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            value = getattr(self, name)
            _check(value >= 1, f"train.{_flag(name)}", value, "an integer >= 1")
        for name in ("micro_batch_size", "warmup_steps", "eval_every", "eval_batches", "seed"):
            value = getattr(self, name)
            _check(value >= 0, f"train.{_flag(name)}", value, "an integer >= 0")
        if self.micro_batch_size:
            _check(
                self.global_batch_size % self.micro_batch_size == 0,
                "train.micro-batch-size",
                self.micro_batch_size,
                f"a divisor of global-batch-size={self.global_batch_size}",
            )
        _check(self.lr > 0, "train.lr", self.lr, "a number > 0")
        _check(0 <= self.min_lr_ratio <= 1, "train.min-lr-ratio", self.min_lr_ratio, "a number in [0, 1]")
        _check(
            0 < self.decay_fraction <= 1, "train.decay-fraction", self.decay_fraction, "a number in (0, 1]"
        )
        _check(self.weight_decay >= 0, "train.weight-decay", self.weight_decay, "a number >= 0")
        _check(0 <= self.beta1 < 1, "train.beta1", self.beta1, "a number in [0, 1)")
        _check(0 <= self.beta2 < 1, "train.beta2", self.beta2, "a number in [0, 1)")
        _check(self.grad_clip >= 0, "train.grad-clip", self.grad_clip, "a number >= 0")
        _check(
            0 <= self.bias_update_until <= 1,
            "train.bias-update-until",
            self.bias_update_until,
            "a number in [0, 1]",
        )
        for name in ("mtp_lambda", "mtp_lambda_late"):
            value = getattr(self, name)
            _check(value >= 0, f"train.{_flag(name)}", value, "a number >= 0")
        switch = self.mtp_lambda_switch
        _check(0 <= switch <= 1, "train.mtp-lambda-switch", switch, "a number in [0, 1]")


@dataclass
class DataConfig:
    """Where tokens come from."""

    path: str = ""
    """a local .txt/.jsonl file or a directory of them; '' = the embedded corpus (Python's own docs)"""
    tokenizer: str = "byte"
    """'byte' (256 symbols, no files) or the path of a Hugging Face tokenizer.json"""
    text_field: str = "text"
    """the key holding the text in .jsonl records"""
    val_fraction: float = 0.05
    """fraction of the corpus held out for validation loss"""

    def validate(self) -> None:
        _check(0 < self.val_fraction < 1, "data.val-fraction", self.val_fraction, "a number in (0, 1)")
        if self.path:
            _check(Path(self.path).exists(), "data.path", self.path, "an existing file or directory")
        if self.tokenizer != "byte":
            _check(
                Path(self.tokenizer).is_file(),
                "data.tokenizer",
                self.tokenizer,
                "'byte' or the path of an existing tokenizer.json",
            )


@dataclass
class ParallelConfig:
    """How the world of processes is laid out on the DeviceMesh."""

    dp_replicate: int = 1
    """HSDP replica groups (parameters replicated across them)"""
    dp_shard: int = -1
    """FSDP shard group size; -1 = whatever the world size leaves"""
    ep: int = 1
    """expert-parallel degree, borrowed from dp-shard (divides it and n-experts)"""
    ep_nodes: int = 1
    """nodes the ep group spans (contiguous blocks of ep ranks); > 1 ties group-limited routing to
    them: model.moe.n-groups must be a multiple, so a token's experts, and the all-to-all rows it
    sends, reach at most model.moe.topk-groups nodes (DeepSeek-V3 node-limited routing)"""
    timeout_s: float = 300.0
    """seconds any rank waits for a peer (the first rendezvous, each collective, a checkpoint's
    barriers) before it stops with an error naming what it waited for, instead of hanging"""

    def validate(self, world_size: int = 1) -> None:
        _check(self.dp_replicate >= 1, "parallel.dp-replicate", self.dp_replicate, "an integer >= 1")
        _check(
            self.dp_shard == -1 or self.dp_shard >= 1,
            "parallel.dp-shard",
            self.dp_shard,
            "-1 or an integer >= 1",
        )
        _check(self.ep >= 1, "parallel.ep", self.ep, "an integer >= 1")
        _check(
            self.ep_nodes >= 1 and self.ep % self.ep_nodes == 0,
            "parallel.ep-nodes",
            self.ep_nodes,
            f"a divisor of ep={self.ep}",
        )
        _check(self.timeout_s > 0, "parallel.timeout-s", self.timeout_s, "a number of seconds > 0")
        shard = self.resolved_dp_shard(world_size)
        _check(
            shard >= 1 and self.dp_replicate * shard == world_size,
            "parallel.dp-shard",
            self.dp_shard,
            f"a value with dp-replicate*dp-shard = world size {world_size}",
        )
        _check(shard % self.ep == 0, "parallel.ep", self.ep, f"a divisor of dp-shard={shard}")

    def validate_for(self, moe: MoEConfig) -> None:
        """The checks that tie the layout to a model's experts and routing groups."""
        _check(
            moe.n_experts % self.ep == 0,
            "parallel.ep",
            self.ep,
            f"a divisor of model.moe.n-experts={moe.n_experts}",
        )
        _check(
            moe.n_groups % self.ep_nodes == 0,
            "model.moe.n-groups",
            moe.n_groups,
            f"a multiple of parallel.ep-nodes={self.ep_nodes}, so that every expert group lives on one node",
        )

    def resolved_dp_shard(self, world_size: int) -> int:
        if self.dp_shard != -1:
            return self.dp_shard
        return world_size // self.dp_replicate


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self, world_size: int = 1) -> Config:
        self.model.validate()
        self.train.validate()
        self.data.validate()
        self.parallel.validate(world_size)
        self.parallel.validate_for(self.model.moe)
        _check(
            self.train.seq_len <= self.model.max_seq_len,
            "train.seq-len",
            self.train.seq_len,
            f"at most model.max-seq-len={self.model.max_seq_len}",
        )
        _check(
            self.train.seq_len > self.model.mtp_depth,
            "train.seq-len",
            self.train.seq_len,
            f"more than model.mtp-depth={self.model.mtp_depth} (each MTP depth predicts one token further)",
        )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Building a Config from presets, files and overrides


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, str] | None = None,
    world_size: int = 1,
) -> Config:
    """Defaults <- preset (default 'tiny' when no file is given) <- TOML file <- dotted overrides.

    With `train.init-from-hf` set (anywhere), the Hugging Face model replaces the preset's model and
    tokenizer: defaults <- preset <- HF model <- TOML file <- dotted overrides.
    """
    if preset is None and config_file is None:
        preset = DEFAULT_PRESET
    cfg = _layered_config(preset, config_file, overrides or {})
    if cfg.train.init_from_hf:
        cfg = _layered_config(preset, config_file, overrides or {}, hf_dir=cfg.train.init_from_hf)
    return cfg.validate(world_size)


def _layered_config(
    preset: str | None, config_file: str | Path | None, overrides: dict[str, str], hf_dir: str | None = None
) -> Config:
    cfg = Config()
    if preset is not None:
        path = PRESETS_DIR / f"{preset}.toml"
        if not path.is_file():
            raise ConfigError(
                f"--preset: unknown preset {preset!r}; allowed: {', '.join(available_presets())}"
            )
        apply_mapping(cfg, _read_toml(path))
    if hf_dir is not None:
        _apply_hf_model(cfg, hf_dir)
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"--config: file {str(path)!r} does not exist")
        apply_mapping(cfg, _read_toml(path))
    for dotted, text in overrides.items():
        set_dotted(cfg, dotted, text)
    return cfg


def _apply_hf_model(cfg: Config, hf_dir: str) -> None:
    """The model of a Hugging Face directory, and its tokenizer.json when it has one."""
    from moeforge.interop.hf import CONFIG_FILE, TOKENIZER_FILE, hf_model_config

    path = Path(hf_dir)
    _check((path / CONFIG_FILE).is_file(), "train.init-from-hf", hf_dir, f"a directory with a {CONFIG_FILE}")
    cfg.model = hf_model_config(path)
    if (path / TOKENIZER_FILE).is_file():
        cfg.data.tokenizer = str(path / TOKENIZER_FILE)


RETIRED_FIELDS = ("parallel.pp",)
"""Fields an older moeforge saved with every run, at their one allowed value, that no longer exist"""


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config saved with `Config.to_dict` (e.g. from a checkpoint), dropping `RETIRED_FIELDS`."""
    cfg = Config()
    apply_mapping(cfg, _without_retired_fields(data))
    return cfg


def _without_retired_fields(data: dict[str, Any]) -> dict[str, Any]:
    kept = dict(data)
    for dotted in RETIRED_FIELDS:
        section, name = dotted.split(".")
        if isinstance(kept.get(section), dict):
            kept[section] = {key: value for key, value in kept[section].items() if key != name}
    return kept


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--config: {path} is not valid TOML: {err}") from None


def apply_mapping(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    """Set fields of a (nested) config dataclass from a (nested) mapping, rejecting unknown keys."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        name = key.replace("-", "_")
        dotted = f"{prefix}{_flag(name)}"
        if name not in fields:
            allowed = ", ".join(_flag(n) for n in fields)
            raise ConfigError(f"{dotted}: unknown field; allowed: {allowed}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a table of fields, got {value!r}")
            apply_mapping(current, value, f"{dotted}.")
        else:
            setattr(obj, name, _coerce(value, _field_type(type(obj), name), dotted))


def set_dotted(cfg: Config, dotted: str, text: str) -> None:
    """Apply one `section.field-name=value` override given as text."""
    parts = dotted.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        name = part.replace("-", "_")
        where = ".".join(parts[: i + 1])
        if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
            options = (
                [_flag(f.name) for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
            )
            raise ConfigError(f"--{where}: unknown option; allowed here: {', '.join(options)}")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, name)):
                raise ConfigError(f"--{where}: is a section; name one of its fields, e.g. --{where}.<field>")
            setattr(obj, name, _coerce(text, _field_type(type(obj), name), where))
        else:
            obj = getattr(obj, name)


def _field_type(cls: type, name: str) -> type:
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, typ: type, where: str) -> Any:
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            lowered = str(value).lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, bool):
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.replace("_", ""))
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)  # a str, or a Literal of strings: `_check_choices` checks the value
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not a valid {typ.__name__}") from None


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _check(ok: bool, where: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: got {value!r}; allowed: {allowed}")


def _check_choices(obj: Any, prefix: str) -> None:
    """The one check of typed choices: each `Literal` field of the config dataclass `obj` holds one
    of the type's values."""
    for name, choices in _choice_fields(type(obj)).items():
        value = getattr(obj, name)
        _check(value in choices, f"{prefix}.{_flag(name)}", value, format_choices(choices))


@cache
def _choice_fields(cls: type) -> dict[str, tuple[str, ...]]:
    """{field name: allowed values} for the `Literal` fields of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {name: typing.get_args(typ) for name, typ in hints.items() if typing.get_origin(typ) is Literal}


def format_choices(choices: tuple[str, ...]) -> str:
    """('a', 'b') -> "'a' | 'b'", as errors and `--help` list allowed values."""
    return " | ".join(repr(c) for c in choices)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The string literal written under each field of a config dataclass: its help text."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())  # type: ignore[union-attr]
    return docs


class Option(NamedTuple):
    """One leaf field as `--help` shows it."""

    flag: str
    """dotted name, e.g. 'model.moe.n-experts'"""
    default: Any
    doc: str
    """the field's docstring"""
    choices: tuple[str, ...]
    """the allowed values of a `Literal` field; () for any other"""


def iter_options(obj: Any = None, prefix: str = "") -> typing.Iterator[Option]:
    """Every leaf field, for `--help`."""
    obj = Config() if obj is None else obj
    docs = field_docs(type(obj))
    choices = _choice_fields(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        dotted = f"{prefix}{_flag(f.name)}"
        if dataclasses.is_dataclass(value):
            yield from iter_options(value, f"{dotted}.")
        else:
            yield Option(dotted, value, docs.get(f.name, ""), choices.get(f.name, ()))
