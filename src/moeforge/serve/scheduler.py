"""Which requests an engine step computes, and how many tokens of each: continuous batching over a
paged cache.

Every step (vLLM's policy, simplified):
1. requests that are decoding (one new token to feed, plus `lookahead` drafts when speculating) go
   first; each takes the blocks its next positions need, and when the cache has none left the newest
   running request is preempted — its blocks freed and the request put back at the head of the
   queue, to be recomputed (its prompt and the tokens it already produced prefilled again) when
   blocks are free. Nothing is dropped and no cache entry is shared, so nothing is corrupted;
2. requests still prefilling take chunks of what is left of the step's token budget;
3. waiting requests join, oldest first, while the batch has room, the budget has tokens and the
   cache has a block for their first chunk.
A request joins and leaves the batch at any step; a long prompt is prefilled in chunks beside the
running decodes instead of stalling them.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

import torch

from moeforge.serve.block_pool import BlockPool
from moeforge.serve.paged_cache import blocks_for
from moeforge.serve.requests import SamplingParams, TokenLogprob


@dataclass(eq=False)
class Sequence:
    """One request as the engine tracks it (compared by identity: the scheduler looks requests up in
    its lists at every step)."""

    request_id: str
    arrival: int
    tokens: list[int]
    """the prompt, then every token produced so far"""
    prompt_len: int
    params: SamplingParams
    generator: torch.Generator
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    """positions whose keys and values are in the cache; the tokens after them are fed next"""
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """collected while the prompt is first prefilled (when asked), sent with the first new token"""
    prompt_logprobs_sent: bool = False
    drafting: object = None
    """the speculative drafter's state for this request (`moeforge.serve.speculation`)"""
    reuses_prefix: bool = False
    """may start from cached blocks of another request's prompt (`block_pool.py`)"""
    digests: list[bytes] = field(default_factory=list)
    """the prefix digests of its blocks indexed so far"""

    @property
    def remaining(self) -> int:
        """Tokens not yet in the cache: 1 while decoding (the newest token), more while prefilling."""
        return len(self.tokens) - self.computed

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclass
class Scheduled:
    sequence: Sequence
    tokens: int
    """tokens of `sequence.tokens` fed this step (from `computed` on)"""
    speculate: bool = False
    """decoding with drafts: the step feeds the newest token and `lookahead` drafts"""


class Scheduler:
    def __init__(self, allocator: BlockPool, block_size: int, max_batch: int, max_step_tokens: int):
        self.allocator = allocator
        self.block_size = block_size
        self.max_batch = max_batch
        self.max_step_tokens = max_step_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        """in arrival order"""
        self.preemptions = 0
        self.prefix_hit_tokens = 0

    def schedule(self, lookahead: int = 0) -> list[Scheduled]:
        """This step's work (see the module's docstring); `lookahead` draft positions per decoding
        request that can speculate (one with its newest token computed once, `computed` > 0)."""
        budget = self.max_step_tokens
        plan: list[Scheduled] = []
        for sequence in list(self.running):
            if sequence not in self.running or sequence.remaining != 1:
                continue
            drafts = lookahead if sequence.computed > 0 else 0
            if self._grow_or_preempt(sequence, len(sequence.tokens) + drafts):
                plan.append(Scheduled(sequence, 1, speculate=drafts > 0))
                budget -= 1 + drafts
        for sequence in self.running:
            if sequence.remaining > 1 and budget > 0:
                chunk = self._grow_for_chunk(sequence, min(budget, sequence.remaining))
                if chunk:
                    plan.append(Scheduled(sequence, chunk))
                    budget -= chunk
        while self.waiting and len(self.running) < self.max_batch and budget > 0:
            sequence = self.waiting[0]
            self._reuse_prefix(sequence)
            reused = sequence.computed
            chunk = self._grow_for_chunk(sequence, min(budget, sequence.remaining))
            if not chunk:
                self._release(sequence)
                break
            self.prefix_hit_tokens += reused
            self.waiting.popleft()
            bisect.insort(self.running, sequence, key=lambda s: s.arrival)
            plan.append(Scheduled(sequence, chunk))
            budget -= chunk
        return plan

    def finish(self, sequence: Sequence) -> None:
        """Take a finished or aborted request out and free its blocks."""
        if sequence in self.running:
            self.running.remove(sequence)
        elif sequence in self.waiting:
            self.waiting.remove(sequence)
        self._release(sequence)

    def _reuse_prefix(self, sequence: Sequence) -> None:
        """Start a request that has nothing in the cache from the blocks of its longest cached prefix."""
        if sequence.reuses_prefix and not sequence.blocks:
            sequence.blocks = self.allocator.match(sequence.tokens)
            sequence.computed = len(sequence.blocks) * self.block_size

    def _release(self, sequence: Sequence) -> None:
        self.allocator.release(sequence.blocks)
        sequence.blocks, sequence.computed, sequence.digests = [], 0, []

    def _grow_or_preempt(self, sequence: Sequence, positions: int) -> bool:
        """Blocks for `positions` positions of `sequence`, preempting the newest running requests
        while the cache has too few; False when `sequence` itself had to go."""
        while not self._grow(sequence, positions):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is sequence:
                return False
        return True

    def reserve(self, sequence: Sequence, positions: int) -> bool:
        """Blocks for `positions` positions of `sequence` when the cache has them free (no preemption)."""
        return self._grow(sequence, positions)

    def _grow_for_chunk(self, sequence: Sequence, chunk: int) -> int:
        """The largest part of a `chunk`-token prefill the free blocks allow (its blocks taken)."""
        held = len(sequence.blocks) * self.block_size - sequence.computed
        chunk = min(chunk, held + self.allocator.free * self.block_size)
        if chunk > 0:
            assert self._grow(sequence, sequence.computed + chunk)
        return max(chunk, 0)

    def _grow(self, sequence: Sequence, positions: int) -> bool:
        missing = blocks_for(positions, self.block_size) - len(sequence.blocks)
        if missing <= 0:
            return True
        blocks = self.allocator.allocate(missing)
        if blocks is None:
            return False
        sequence.blocks += blocks
        return True

    def _preempt(self, sequence: Sequence) -> None:
        """Free the blocks of `sequence` and queue it first, to be recomputed from its first token."""
        self.running.remove(sequence)
        self._release(sequence)
        sequence.drafting = None
        self.waiting.appendleft(sequence)
        self.preemptions += 1
