"""Bytes the non-matmul work of a training step moves through memory: norms, residual adds, RoPE,
attention I/O, SwiGLU's elementwise product, the router, the dispatch gather and combine, the loss
over the vocabulary, and the optimizer. On a device whose matmuls are small these memory-bound
kernels take as long as the matmuls; the planner charges them at the device's copy bandwidth
(`Cluster.elementwise_bandwidth`, 0 = folded into the whole-step efficiency, as on the GPU presets).

The counts are elements read plus elements written per token (one tensor of width w read once is
w), from the model's code, op by op (`moeforge.model`). Conventions, fixed before any comparison:
- a unary elementwise op over width w moves 2w (read, write), a binary one 3w;
- a view (reshape, split, chunk, transpose) moves nothing, a copy into a new layout 2w;
- a matmul's own reads and writes are the matmul's (`plan.block_flops`), not counted here;
- integer bookkeeping over the k assignments of a token (sort, bincount, inverse permutation) is
  a few k integers, negligible next to k x dim rows, and not counted;
- the backward moves `BACKWARD_FACTOR` x the forward's bytes: it reads the output gradient and
  the saved inputs of each op and writes the input gradients.
Two ops are counted from the kernels torch runs instead, forward and backward, after runs showed the
conventions far off for them (docs/benchmarks/plan.md; tests profile those kernels): RMSNorm under
autograd and the S x S scores of attention written out (SDPA's math path). MLA's value padding (the
'padded' attention kernel) adds its copies and the wider SDPA I/O (`padding_elements`).
"""

from __future__ import annotations

from moeforge.config import ModelConfig
from moeforge.model.flops import attention_head_dims
from moeforge.plan.tensors import transformer_blocks

BACKWARD_FACTOR = 2.0
"""backward bytes of the elementwise work per forward byte (see the module docstring)"""

ADAMW_ELEMENTS = 7
"""elements moved per parameter by the trainer's AdamW step (fused, `train.optim.build_optimizer`):
one pass reads the parameter, its gradient and both moments (4) and writes the parameter and the
moments back (3); weight decay and the bias corrections happen on the way, in registers"""

CLIP_ELEMENTS = 5
"""elements moved per parameter by the trainer's gradient clipping: grad.square() 2, its sum 1, and
grad.mul_(scale) 2 (`parallel.parallelize.clip_grad_norm_`); zero_grad(set_to_none) moves none"""


RMS_NORM_FORWARD = 7.0
"""elements per normalised element of torch's RMSNorm forward (fp32 on CPU, `_fused_rms_norm` as
composite kernels): x^2 2w, its mean w, x * rsqrt 2w, * weight 2w (the per-row rsqrt is negligible)"""

RMS_NORM_BACKWARD = 25.0
"""and of its backward under autograd: the weight's product (its gradient 3w and row sum w, the
input's 2w), the rsqrt's product (3w, w, 2w), the mean's expansion w, the square's derivative (pow
2w, its copy 2w, x 2 2w, the product 3w), and the add of the input gradient's two paths 3w"""


def rms_norm(width: float) -> float:
    """An RMSNorm's forward over `width` elements per token: `RMS_NORM_FORWARD` w (the weight is
    per-layer, not per token)."""
    return RMS_NORM_FORWARD * width


def attention_norm_widths(cfg: ModelConfig) -> float:
    """Elements per token that an attention half normalises: its input d; MLA's latents r_kv (and
    r_q); GQA's per-head q/k norms (H + H_kv) hd when `qk_norm`."""
    widths = float(cfg.dim)
    if cfg.attention == "mla":
        widths += cfg.kv_lora_rank + (cfg.q_lora_rank or 0)
    elif cfg.qk_norm:
        widths += (cfg.n_heads + cfg.n_kv_heads) * cfg.resolved_head_dim
    return widths


def norm_widths_by_block(cfg: ModelConfig) -> dict[int, float]:
    """Elements per token normalised in each block (indexed as `forward_elements_by_block`): a main
    block's attention norms and its FFN norm; at n_layers the final norm and, per MTP module, its
    two input norms, a block like the last one and its final norm."""
    block = attention_norm_widths(cfg) + cfg.dim
    widths = {-1: 0.0, **{b: block for b in range(cfg.n_layers)}}
    widths[cfg.n_layers] = cfg.dim + cfg.mtp_depth * (2.0 * cfg.dim + block + cfg.dim)
    return widths


def rope(width: int) -> float:
    """RoPE over `width` rotated elements (`model.attention.apply_rope`): -x[half:] w, the cat of the
    halves 2w, x*cos 3w, rotated*sin 3w, their sum 3w: 12 w."""
    return 12.0 * width


def swiglu(hidden: int) -> float:
    """silu(gate) 2h and its product with up 3h (the chunk is a view): 5 h per row."""
    return 5.0 * hidden


def attention_elements(cfg: ModelConfig) -> float:
    """Forward elements per token of a block's attention half: its norm 2d, RoPE, the tensors SDPA
    reads and writes (q, k, v in, the output out; the score matrix stays in the fused kernel), the
    copy of the output into [S, heads x v] 2 H v, and the residual add 3d.

    GQA: RoPE over (H + H_kv) x hd, SDPA (H + 2 H_kv) hd in and H hd out.
    MLA: the latent's norm 2 r_kv (and the query latent's 2 r_q), RoPE over H x rope + rope, the
    two cats that build q and k 2 x 2 H (nope + rope), SDPA 2 H (nope + rope) + H v in, H v out."""
    d, heads = cfg.dim, cfg.n_heads
    if cfg.attention == "mla":
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        v = cfg.v_head_dim
        rotated = rope(heads * cfg.qk_rope_head_dim + cfg.qk_rope_head_dim)
        cats = 2 * 2.0 * heads * qk
        sdpa = 2.0 * heads * qk + heads * v + heads * v
        inner = rotated + cats + sdpa + 2.0 * heads * v
    else:
        hd, kv_heads = cfg.resolved_head_dim, cfg.n_kv_heads
        sdpa = (heads + 2 * kv_heads) * hd + heads * hd
        inner = rope((heads + kv_heads) * hd) + sdpa + 2.0 * heads * hd
    return rms_norm(attention_norm_widths(cfg)) + inner + 3.0 * d


SCORE_PASSES_FORWARD = 10.0
"""elements per score of the written-out attention's forward (`score_elements`)"""
SCORE_PASSES_BACKWARD = 3.0
"""and of its backward"""


def score_elements(cfg: ModelConfig, seq_len: int) -> tuple[float, float]:
    """(forward, backward) elements per token of one attention layer's S x S scores when they are
    written out (SDPA's math path: the 'eager' attention kernel, e.g. MLA's unequal q/k and v widths
    on the CPU without moeforge's padding), per head a row of S scores. Forward: the causal mask's add 2S, `_safe_softmax` = softmax 2S,
    `isneginf` 2S, the row's `all` S and `where` 3S: 10 S. Backward: `_softmax_backward_data` reads
    the gradient and the probabilities and writes 3S; the add's gradient passes through. (The two
    products are matmuls, `plan.block_flops`.) Not under `BACKWARD_FACTOR`'s rule, since these ops'
    backward is lighter than their forward (`backward_elements_by_block`). A fused kernel keeps the
    scores on chip: none."""
    row = cfg.n_heads * seq_len
    return SCORE_PASSES_FORWARD * row, SCORE_PASSES_BACKWARD * row


def dense_ffn_elements(cfg: ModelConfig) -> float:
    """Forward elements per token of a dense block's second half: norm 2d, SwiGLU 5 ffn, residual 3d."""
    return rms_norm(cfg.dim) + swiglu(cfg.ffn_dim) + 3.0 * cfg.dim


def router_elements(cfg: ModelConfig) -> float:
    """Forward elements per token of the router over E experts: sigmoid/softmax 2E, + bias 3E, the
    group scores' top-2 read E, the mask's fill 2E, the top-k read E; the gates' gather and
    normalisation over k are a few k (counted 6k); each enabled balance loss reads the scores
    again and normalises them (3E) and averages them (E): 4E."""
    moe = cfg.moe
    e = moe.n_experts
    groups = (e + 2.0 * e) if moe.n_groups > 1 else 0.0
    losses = sum(1 for coef in (moe.seq_aux_coef, moe.aux_coef, moe.z_loss_coef) if coef > 0)
    return 2.0 * e + 3.0 * e + groups + e + 6.0 * moe.top_k + 4.0 * e * losses


def moe_ffn_elements(cfg: ModelConfig) -> float:
    """Forward elements per token of an MoE block's second half: norm 2d, the router, the dispatch
    gather of k rows of width d (read + write 2kd), SwiGLU on the k routed rows 5 k h_e and on the
    shared experts 5 h_s, the combine's permutation back 2kd and its gate-weighted sum (reads kd,
    writes d), the shared output's add 3d and the residual add 3d."""
    moe, d = cfg.moe, cfg.dim
    k = moe.top_k
    dispatch = 2.0 * k * d
    experts = k * swiglu(moe.expert_ffn_dim) + swiglu(moe.n_shared_experts * moe.expert_ffn_dim)
    combine = 2.0 * k * d + k * d + d + (3.0 * d if moe.n_shared_experts else 0.0)
    return rms_norm(d) + router_elements(cfg) + dispatch + experts + combine + 3.0 * d


def block_elements(cfg: ModelConfig, layer_id: int) -> float:
    """Forward elements per token of main block `layer_id` (dense or MoE)."""
    ffn = moe_ffn_elements(cfg) if cfg.is_moe_layer(layer_id) else dense_ffn_elements(cfg)
    return attention_elements(cfg) + ffn


def head_loss_elements(cfg: ModelConfig) -> float:
    """Forward elements per token of the final norm 2d and the cross-entropy over the vocabulary:
    log-softmax reads and writes V (2V), the loss gathers one (the logits' write is the head
    matmul's)."""
    return rms_norm(cfg.dim) + 2.0 * cfg.vocab_size + 1.0


def mtp_module_elements(cfg: ModelConfig) -> float:
    """Forward elements per token of one MTP module: the embedding gather 2d, the two input norms
    4d, their cat 4d, a block like the main model's last, the final norm and the loss over V."""
    d = cfg.dim
    return (
        2.0 * d + 2 * rms_norm(d) + 4.0 * d + block_elements(cfg, cfg.n_layers - 1) + head_loss_elements(cfg)
    )


def padding_elements(cfg: ModelConfig) -> float:
    """Forward elements per token that MLA's value padding adds (the 'padded' attention kernel): the
    pad's copy reads H v and writes H qk, and SDPA reads the values and writes its output H qk wide
    instead of H v: 3 H qk - H v. (GQA, or values as wide as the queries: none.)"""
    qk, v = attention_head_dims(cfg)
    return cfg.n_heads * (3.0 * qk - v) if v < qk else 0.0


def forward_elements_by_block(cfg: ModelConfig, seq_len: int = 0, attention_kernel: str = "fused") -> dict[int, float]:
    """Forward elements per token of each block, indexed as `plan.block_flops.flops_per_token_by_block`
    (-1 the embedding gather 2d; n_layers the head, the loss and the MTP modules); each attention
    layer's S x S scores too under the 'eager' kernel (`score_elements`), its value padding under
    'padded' (`padding_elements`)."""
    elements = {-1: 2.0 * cfg.dim}
    for b in range(cfg.n_layers):
        elements[b] = block_elements(cfg, b)
    elements[cfg.n_layers] = head_loss_elements(cfg) + cfg.mtp_depth * mtp_module_elements(cfg)
    extra = {"eager": score_elements(cfg, seq_len)[0], "padded": padding_elements(cfg)}.get(attention_kernel, 0.0)
    if extra:
        elements = {b: e + extra * transformer_blocks(cfg, [b]) for b, e in elements.items()}
    return elements


def backward_elements_by_block(cfg: ModelConfig, seq_len: int = 0, attention_kernel: str = "fused") -> dict[int, float]:
    """Backward elements per token of each block: `BACKWARD_FACTOR` x the forward's, except where the
    backward of an op is known to move otherwise: RMSNorm (`RMS_NORM_BACKWARD` w, not 2 x
    `RMS_NORM_FORWARD` w) and written-out attention scores (`score_elements`)."""
    padded = "padded" if attention_kernel == "padded" else "fused"
    forward = forward_elements_by_block(cfg, seq_len, padded)
    norms = norm_widths_by_block(cfg)
    norm_surplus = RMS_NORM_BACKWARD - BACKWARD_FACTOR * RMS_NORM_FORWARD
    elements = {b: BACKWARD_FACTOR * forward[b] + norm_surplus * norms[b] for b in forward}
    if attention_kernel == "eager":
        scores = score_elements(cfg, seq_len)[1]
        elements = {b: e + scores * transformer_blocks(cfg, [b]) for b, e in elements.items()}
    return elements


def optimizer_elements_per_parameter(clipping: bool = True) -> float:
    """Elements one optimizer step moves per parameter of the rank's shard: AdamW with weight decay
    (`ADAMW_ELEMENTS`), and the gradient clipping's read and scale (`CLIP_ELEMENTS`) if clipping."""
    return ADAMW_ELEMENTS + (CLIP_ELEMENTS if clipping else 0)
