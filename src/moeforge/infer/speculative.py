"""Speculative decoding with the model's own MTP modules as the drafter (DeepSeek-V3 §5.4.3).

Each round the D MTP modules draft D tokens, chained: module k drafts t_{n+k} from h^{k-1} and the
token before it. One forward of the main model over [t_n, d_1, ..., d_D] with the KV cache scores
all of them at once; the drafts it agrees with are kept, followed by the main model's own token at
the first disagreement (or after the last draft), so every round yields 1 to D+1 tokens.

- Greedy: a draft is kept when it is the main model's argmax, so the output is token for token the
  plain greedy output.
- Sampling: a draft d ~ q is kept with probability min(1, p(d)/q(d)), and a rejection draws from
  norm(max(0, p - q)) (Leviathan et al. 2023, alg. 1; Chen et al. 2023), which leaves every token
  distributed exactly as in plain sampling from p.

It runs on the path plain decoding takes (`infer/decode.py`): static caches written at slot tensors,
and a verify forward of fixed shape [1, D+1] that `compile` compiles like the one-token step.
Rolling the caches back is free: attention masks every slot past the newest token, so the entries of
rejected drafts are simply overwritten by the next round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from moeforge.config import ConfigError
from moeforge.infer.decode import DecodeStep, decode_step, steady_state
from moeforge.infer.generate import (
    GenerationResult,
    SamplingConfig,
    check_request,
    sample_next,
    token_probabilities,
)
from moeforge.model.attention import cache_slots
from moeforge.model.transformer import Transformer


@dataclass
class SpeculativeResult:
    prompt_tokens: list[int]
    new_tokens: list[int]
    prefill_s: float
    decode_s: float
    drafted: int
    """draft tokens proposed"""
    accepted: int
    """draft tokens the main model kept"""
    rounds: int
    """draft-and-verify rounds, one main-model forward each"""

    @property
    def tokens_per_s(self) -> float:
        """Decoded tokens per second after the prompt (the first new token comes from the prefill),
        drafting included."""
        decoded = len(self.new_tokens) - 1
        return decoded / self.decode_s if decoded > 0 and self.decode_s > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        """New tokens per main-model forward (plain decoding: 1)."""
        return (len(self.new_tokens) - 1) / self.rounds if self.rounds else 0.0


def comparison_with_plain(speculative: SpeculativeResult, plain: GenerationResult, greedy: bool) -> dict[str, Any]:
    """The figures `generate --speculative --json` reports: both speeds, their ratio, acceptance."""
    report = {
        "tokens_per_s": speculative.tokens_per_s,
        "plain_tokens_per_s": plain.tokens_per_s,
        "speedup": speculative.tokens_per_s / plain.tokens_per_s if plain.tokens_per_s else 0.0,
        "acceptance_rate": speculative.acceptance_rate,
        "tokens_per_round": speculative.tokens_per_round,
        "drafted": speculative.drafted,
        "accepted": speculative.accepted,
    }
    if greedy:
        report["identical_to_plain"] = speculative.new_tokens == plain.new_tokens
    return report


class MTPDrafter:
    """Runs the MTP modules incrementally, with their own KV caches, and drafts D tokens per round.

    Module k at position i reads h^{k-1}_i and token t_{i+k}. With tokens accepted up to t_n, its
    positions i <= n-k have only accepted inputs; past those it also reads drafts, which may be
    rejected. `first_unsettled[k-1]` is where module k's settled positions end: each round recomputes
    (and overwrites in its cache) from there. `hidden[k]` keeps h^k per position, h^0 coming from the
    main model (`record_main_hidden`).
    """

    def __init__(self, model: Transformer, max_len: int):
        self.model = model
        depth = model.cfg.mtp_depth
        weight = model.tok_embeddings.weight
        self.hidden = torch.zeros(depth, max_len, model.cfg.dim, dtype=weight.dtype, device=weight.device)
        self.first_unsettled = [0] * depth

    def record_main_hidden(self, start_pos: int, hidden: torch.Tensor) -> None:
        """Store the main model's h^0 [S, dim] of accepted tokens at positions [start_pos, start_pos + S)."""
        self.hidden[0, start_pos : start_pos + hidden.shape[0]] = hidden

    def draft(
        self, tokens: list[int], sampling: SamplingConfig, generator: torch.Generator
    ) -> tuple[list[int], torch.Tensor | None]:
        """D drafts following `tokens` (h^0 recorded up to the second-to-last), and their draft
        distributions [D, vocab] when sampling (None when greedy)."""
        sequence = list(tokens)
        draft_probs = []
        for depth in range(1, len(self.model.mtp) + 1):
            logits = self._advance(depth, sequence, len(tokens) - 1)
            if sampling.temperature == 0:
                sequence.append(int(logits.argmax()))
            else:
                probs = token_probabilities(logits, sampling)
                sequence.append(int(torch.multinomial(probs, 1, generator=generator)))
                draft_probs.append(probs[0])
        return sequence[len(tokens) :], torch.stack(draft_probs) if draft_probs else None

    def _advance(self, depth: int, sequence: list[int], n: int) -> torch.Tensor:
        """Run MTP module `depth` over its positions from the first unsettled one to n-1 (overwriting
        their cache entries); returns the logits [1, vocab] of its draft for t_{n+depth}."""
        model, module = self.model, self.model.mtp[depth - 1]
        start = self.first_unsettled[depth - 1]
        device = self.hidden.device
        embed_tokens = torch.tensor([sequence[start + depth : n + depth]], device=device)
        input_pos = torch.arange(start, n, device=device)
        hidden, _ = module(
            self.hidden[depth - 1, start:n].unsqueeze(0),
            model.tok_embeddings(embed_tokens),
            *model.rope_at(input_pos),
            cache_slots(input_pos, model.cache_len),
        )
        hidden = hidden[0]
        if depth < len(model.mtp):
            self.hidden[depth, start:n] = hidden
        self.first_unsettled[depth - 1] = max(0, n - depth + 1)
        return model.output(hidden[-1:])


def accept_greedy(drafts: list[int], target_choices: list[int]) -> list[int]:
    """A greedy round's new tokens: the drafts the main model agrees with, then its own next token.
    `target_choices[j]` is the main model's argmax after drafts[:j] (one more than there are drafts)."""
    kept = 0
    while kept < len(drafts) and drafts[kept] == target_choices[kept]:
        kept += 1
    return drafts[:kept] + [target_choices[kept]]


def accept_sampled(
    drafts: list[int], draft_probs: torch.Tensor, target_probs: torch.Tensor, generator: torch.Generator
) -> list[int]:
    """A sampled round's new tokens by the rejection rule: keep d_j with probability
    min(1, p_j(d_j) / q_j(d_j)); at the first rejection draw from norm(max(0, p_j - q_j)) and stop;
    with every draft kept, draw one more token from p_{D+1}. `target_probs` is [D+1, vocab]."""
    for j, draft in enumerate(drafts):
        p, q = target_probs[j, draft], draft_probs[j, draft]
        if torch.rand((), generator=generator, device=q.device) * q >= p:
            residual = (target_probs[j] - draft_probs[j]).clamp(min=0)
            # p <= q everywhere means p == q up to rounding, where rejection has probability ~0.
            residual = residual if residual.sum() > 0 else target_probs[j]
            return drafts[:j] + [int(torch.multinomial(residual, 1, generator=generator))]
    return drafts + [int(torch.multinomial(target_probs[-1], 1, generator=generator))]


def verify(
    step: DecodeStep,
    model: Transformer,
    tokens: list[int],
    drafts: list[int],
    draft_probs: torch.Tensor | None,
    sampling: SamplingConfig,
    generator: torch.Generator,
) -> tuple[list[int], torch.Tensor]:
    """One main-model forward (`step`) over [t_n, d_1..d_D] at positions n..n+D: the round's new
    tokens and the main model's h^0 at those positions [D+1, dim]."""
    device = model.tok_embeddings.weight.device
    inputs = torch.tensor([[tokens[-1], *drafts]], device=device)
    start = len(tokens) - 1
    logits, hidden = step(model, inputs, torch.arange(start, start + len(inputs[0]), device=device), None)
    if sampling.temperature == 0:
        new_tokens = accept_greedy(drafts, logits[0].argmax(dim=-1).tolist())
    else:
        new_tokens = accept_sampled(drafts, draft_probs, token_probabilities(logits[0], sampling), generator)
    return new_tokens, hidden[0]


@torch.no_grad()
def speculative_generate(
    model: Transformer,
    prompt_tokens: list[int],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    eos_id: int | None = None,
    compile: bool = False,
) -> SpeculativeResult:
    """Continue `prompt_tokens` by up to `max_new_tokens` tokens, drafting with the MTP modules
    (sampling: `SamplingConfig()` when None, as in `generate`); `compile` compiles the verify step."""
    sampling = sampling or SamplingConfig()
    depth = model.cfg.mtp_depth
    if depth == 0:
        raise ConfigError(
            "--speculative: this model has model.mtp-depth=0; allowed: a model trained with MTP modules"
        )
    max_len = check_request(model, prompt_tokens, max_new_tokens, sampling, lookahead=depth)
    model.eval()
    device = model.tok_embeddings.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    model.setup_caches(batch=1, max_len=max_len, with_mtp=True)
    drafter = MTPDrafter(model, max_len)
    drafted = accepted = rounds = 0
    step = decode_step(compile, device)
    try:
        if compile:  # compiles before timing; writes slots 0..D, which the prefill overwrites
            slots = torch.arange(depth + 1, device=device)
            step(model, torch.zeros_like(slots).view(1, -1), slots, None)
        started = time.perf_counter()
        out = model(torch.tensor([prompt_tokens], device=device))
        logits, hidden = out.logits, out.hidden
        drafter.record_main_hidden(0, hidden[0])
        tokens = [*prompt_tokens, int(sample_next(logits[:, -1], sampling, generator))]
        prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        with steady_state(compile):
            while len(tokens) - len(prompt_tokens) < max_new_tokens and eos_id not in tokens[len(prompt_tokens) :]:
                drafts, draft_probs = drafter.draft(tokens, sampling, generator)
                new_tokens, hidden = verify(step, model, tokens, drafts, draft_probs, sampling, generator)
                drafter.record_main_hidden(len(tokens) - 1, hidden[: len(new_tokens)])
                tokens += new_tokens
                drafted, accepted, rounds = drafted + len(drafts), accepted + len(new_tokens) - 1, rounds + 1
        decode_s = time.perf_counter() - started
    finally:
        model.clear_caches()
    new_tokens = _stop_at_eos(tokens[len(prompt_tokens) :][:max_new_tokens], eos_id)
    return SpeculativeResult(list(prompt_tokens), new_tokens, prefill_s, decode_s, drafted, accepted, rounds)


def _stop_at_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens
