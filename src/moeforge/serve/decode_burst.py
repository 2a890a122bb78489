"""Several decoding steps in one engine step (vLLM's multi-step scheduling): while every running
request is decoding and no waiting request could join, the engine feeds each request's chosen token
straight back for up to `EngineConfig.decode_steps` forwards, and schedules, builds rows and hands
out tokens once for all of them.

What a step costs beyond its forward — the scheduler, the rows' tensors, each request's accounting
and output, and downstream the server's event per request — is paid once per burst instead of once
per token; a small model's forward is short enough for that to be a large share of it. The price:
a request that arrives during a burst waits for its end (at most `decode_steps` - 1 forwards) to
join, and its tokens reach a streaming client in groups.

The tokens are the ones single steps would choose: each forward is the same rows forward over the
same cache, and each request's next token is chosen from its own row's logits by the same rule
(the argmax, or a draw from its own generator: `Engine._sample`), one token per forward. A request whose
stop token comes mid-burst has computed a few positions past it in its own blocks, which it frees
as it finishes; one that reaches `max_tokens` mid-burst stops feeding (its later rows are padding:
`BurstRows`), so no request's positions pass what it was admitted for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moeforge.serve.rows import Row, RowBatch, Segment, row_batch


@dataclass
class BurstRows:
    """The rows of a burst over decoding requests: request r feeds its newest token at position
    `starts[r]` and then `forwards[r]` - 1 tokens it chooses (its `max_tokens` may allow fewer than the
    burst's length); after that its row is padding, writing to the scratch block."""

    batch: RowBatch
    """the first forward's rows; its tables already hold the blocks of the burst's last position"""
    starts: list[int]
    forwards: list[int]

    @property
    def length(self) -> int:
        """Forwards in the burst."""
        return max(self.forwards)

    def step(self, index: int, tokens: torch.Tensor) -> RowBatch:
        """The rows of forward `index`, feeding `tokens` [B] (those chosen by forward index - 1;
        at 0 the requests' newest tokens, already in `batch`)."""
        # a row past its last forward stays at its last position, its token a padding one
        positions = [start + min(index, n - 1) for start, n in zip(self.starts, self.forwards)]
        context = max(max(positions) + 1, 2)
        if index == 0:
            return dataclasses.replace(self.batch, context=context)
        padding = self.batch.tokens.shape[0] - len(self.starts)
        fed = [index < n for n in self.forwards] + [False] * padding
        device = self.batch.tokens.device
        return dataclasses.replace(
            self.batch,
            tokens=tokens.view(-1, 1),
            positions=torch.tensor(positions + [0] * padding, device=device).view(-1, 1),
            counts=torch.tensor(fed, device=device).long().view(-1, 1),
            context=context,
        )


def burst_rows(
    segments: list[Segment], forwards: list[int], block_size: int, scratch: int, device: torch.device, min_rows: int
) -> BurstRows:
    """The rows of a burst over one-token `segments` (each request's newest token, its block table
    holding every position the burst feeds it), `forwards[r]` of them feeding request r."""
    last = max(s.start + n for s, n in zip(segments, forwards))
    rows = [Row(i, 0, 1) for i in range(len(segments))]
    batch = row_batch(segments, rows, block_size, scratch, device, min_rows, min_context=last)
    return BurstRows(batch, [s.start for s in segments], forwards)


def run_burst(
    rows: BurstRows,
    forward: Callable[[RowBatch], torch.Tensor],
    head: Callable[[torch.Tensor], torch.Tensor],
    choose: Callable[[int, torch.Tensor], torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each forward's logits [B, vocab] (B padded rows) and the tokens [B] that `choose(i, logits)`
    picks from forward i's, which forward i + 1 feeds; `forward` returns a batch's final hidden
    states [B, dim] and `head` maps them to logits."""
    logits: list[torch.Tensor] = []
    chosen: list[torch.Tensor] = [torch.empty(0)]
    for index in range(rows.length):
        logits.append(head(forward(rows.step(index, chosen[-1]))))
        chosen.append(choose(index, logits[-1]))
    return logits, chosen[1:]
