"""Speculative decoding for a whole batch: the MTP modules draft D tokens for every decoding request,
one forward of the main model verifies them all, and each request keeps its own number.

The rules are `moeforge.infer.speculative`'s, per request: greedy keeps a draft while it is the main
model's argmax (the output is token for token plain greedy decoding); sampling keeps a draft d ~ q
with probability min(1, p(d)/q(d)) and on rejection draws from norm(max(0, p - q)), which leaves every
token distributed as plain sampling from p. What is new here is the bookkeeping of a batch on a paged
cache: a request that accepts a of its D drafts has the keys and values of positions n .. n+a right
in the cache; the entries of its rejected drafts, past its newest token, are never read (the mask
stops each query at its own position) and are overwritten when those positions are fed again. So
rolling back is moving `computed` forward by a, no copy.

Module k at position i reads h^{k-1}_i and token t_{i+k} (DeepSeek-V3 eq. 21). With tokens accepted
up to t_n, its positions i <= n-k read only accepted inputs; each round recomputes (and overwrites in
its cache) the positions from the first unsettled one to n-1, as `infer.speculative.MTPDrafter` does
for one sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeforge.infer.generate import token_probabilities
from moeforge.infer.speculative import accept_greedy, accept_sampled
from moeforge.model.transformer import Transformer
from moeforge.serve.rows import RowBatch, Segment, forward_segments
from moeforge.serve.scheduler import Scheduled, Sequence


@dataclass
class DraftState:
    """One request's drafter: h^k by position (h^0 from the main model) and, per module, the first
    position it has not settled."""

    hidden: list[dict[int, torch.Tensor]]
    first_unsettled: list[int]


@dataclass
class Drafted:
    tokens: list[int]
    probs: torch.Tensor | None = None
    """[D, vocab], the draft distributions q (None when greedy)"""


class Speculator:
    def __init__(self, model: Transformer, block_size: int, scratch_block: int, min_rows: int = 1):
        self.model = model
        self.depth = model.cfg.mtp_depth
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.min_rows = min_rows

    def state(self, sequence: Sequence) -> DraftState:
        if sequence.drafting is None:
            sequence.drafting = DraftState([{} for _ in range(self.depth)], [0] * self.depth)
        return sequence.drafting

    def record_hidden(self, sequence: Sequence, start: int, hidden: torch.Tensor) -> None:
        """Keep the main model's h^0 [S, dim] of positions start .. start+S-1 (accepted tokens only)."""
        rows = self.state(sequence).hidden[0]
        for offset in range(hidden.shape[0]):
            rows[start + offset] = hidden[offset]

    def draft(self, items: list[Scheduled]) -> dict[str, Drafted]:
        """D drafts for each speculating request, one forward per MTP module (and group of rows)."""
        if not items:
            return {}
        sequences = [item.sequence for item in items]
        drafts: dict[str, list[int]] = {s.request_id: [] for s in sequences}
        probs: dict[str, list[torch.Tensor]] = {s.request_id: [] for s in sequences}
        for depth in range(1, self.depth + 1):
            logits = self._advance(depth, sequences, drafts)
            for sequence, row in zip(sequences, logits):
                params = sequence.params
                if params.greedy:
                    drafts[sequence.request_id].append(int(row.argmax()))
                    continue
                q = token_probabilities(row[None], params.sampling_config())[0]
                drafts[sequence.request_id].append(int(torch.multinomial(q, 1, generator=sequence.generator)))
                probs[sequence.request_id].append(q)
        return {
            s.request_id: Drafted(
                drafts[s.request_id], torch.stack(probs[s.request_id]) if probs[s.request_id] else None
            )
            for s in sequences
        }

    def _advance(self, depth: int, sequences: list[Sequence], drafts: dict[str, list[int]]) -> torch.Tensor:
        """Run MTP module `depth` over each request's positions from its first unsettled one to n-1;
        the logits [requests, vocab] of each request's draft for t_{n+depth}."""
        model, module = self.model, self.model.mtp[depth - 1]
        segments, inputs = [], []
        for sequence in sequences:
            state = self.state(sequence)
            extended = sequence.tokens + drafts[sequence.request_id]
            n = len(sequence.tokens) - 1
            start = state.first_unsettled[depth - 1]
            segments.append(Segment(extended[start + depth : n + depth], start, sequence.blocks))
            inputs.append(torch.stack([state.hidden[depth - 1][i] for i in range(start, n)]))

        def forward(batch: RowBatch) -> torch.Tensor:
            x = inputs[0].new_zeros(*batch.tokens.shape, inputs[0].shape[-1])  # h^{k-1}; zero on padding
            for index, row in enumerate(batch.rows):
                x[index, : row.stop - row.start] = inputs[row.member][row.start : row.stop]
            out, _ = module(
                x, model.tok_embeddings(batch.tokens), *model.rope_at(batch.positions), batch.slots
            )
            return out.reshape(-1, out.shape[-1])

        device = model.tok_embeddings.weight.device
        hidden = forward_segments(
            segments, forward, self.block_size, self.scratch_block, device, self.min_rows
        )
        last_rows = []
        for sequence, segment, rows in zip(sequences, segments, hidden):
            state, n = self.state(sequence), len(sequence.tokens) - 1
            if depth < self.depth:
                for i, row in zip(range(segment.start, n), rows):
                    state.hidden[depth][i] = row
            settled = max(0, n - depth + 1)
            state.first_unsettled[depth - 1] = settled
            for i in [p for p in state.hidden[depth - 1] if p < settled]:
                del state.hidden[depth - 1][i]  # h^{depth-1} of settled positions is read no more
            last_rows.append(rows[-1])
        return model.output(torch.stack(last_rows))

    def accept(
        self,
        sequence: Sequence,
        drafted: Drafted,
        logits: torch.Tensor,
        hidden: torch.Tensor,
        choices: list[int],
    ) -> list[int]:
        """The round's new tokens from the verify rows (logits [D+1, vocab], h^0 [D+1, dim] of the
        newest token and the drafts, `choices` the logits' argmaxes): the kept drafts then the
        model's own token. Moves `computed` past the kept drafts and records their h^0."""
        params = sequence.params
        if params.greedy:
            new_tokens = accept_greedy(drafted.tokens, choices)
        else:
            target = token_probabilities(logits, params.sampling_config())
            new_tokens = accept_sampled(drafted.tokens, drafted.probs, target, sequence.generator)
        kept = len(new_tokens) - 1
        self.record_hidden(sequence, sequence.computed, hidden[1 : 1 + kept])
        sequence.computed += kept
        return new_tokens
