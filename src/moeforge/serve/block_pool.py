"""The cache's blocks: which are free, which requests hold them, and which hold a prompt prefix that
a later request may reuse.

Prefix reuse (vLLM's automatic prefix caching): a full block whose positions are computed is indexed
by a digest of every token up to its end (SHA-256, chained block to block, so equal digests mean
equal prefixes). A new request whose prompt starts with indexed blocks takes them as they are — their
keys and values are those its own prefill would compute — and prefills only the rest. Blocks are
shared read-only: a request writes only positions past what it has computed, and a matched block lies
wholly before that. A block no request holds stays indexed (and reusable) until a new allocation
needs it; the least recently released goes first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict


def block_digests(tokens: list[int], block_size: int, start: bytes = b"") -> list[bytes]:
    """The chained digest of each full block of `tokens`: block i's covers tokens[: (i+1) * block_size]."""
    digests, digest = [], start
    for end in range(block_size, len(tokens) + 1, block_size):
        chunk = b"".join(token.to_bytes(4, "little") for token in tokens[end - block_size : end])
        digest = hashlib.sha256(digest + chunk).digest()
        digests.append(digest)
    return digests


class BlockPool:
    def __init__(self, n_blocks: int, block_size: int):
        self.total = n_blocks
        self.block_size = block_size
        self._free = list(range(n_blocks - 1, -1, -1))
        self._holders = [0] * n_blocks
        self._digest_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()
        """indexed blocks no request holds, least recently released first"""

    @property
    def free(self) -> int:
        """Blocks an allocation can take: the free ones and the idle indexed ones."""
        return len(self._free) + len(self._idle)

    @property
    def used(self) -> int:
        """Blocks held by requests."""
        return self.total - self.free

    def allocate(self, count: int) -> list[int] | None:
        """`count` blocks for one holder, or None (and nothing taken) when fewer are available."""
        if count > self.free:
            return None
        blocks = []
        for _ in range(count):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._idle.popitem(last=False)
                del self._block_of[self._digest_of.pop(block)]
            self._holders[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: list[int]) -> None:
        for block in reversed(blocks):
            self._holders[block] -= 1
            if self._holders[block] == 0:
                if block in self._digest_of:
                    self._idle[block] = None
                else:
                    self._free.append(block)

    def match(self, tokens: list[int]) -> list[int]:
        """The indexed blocks that hold `tokens`' longest indexed prefix of full blocks, leaving at
        least the last token to compute (its logits give the next token); each is now held once more."""
        matched = []
        for digest in block_digests(tokens[: len(tokens) - 1], self.block_size):
            block = self._block_of.get(digest)
            if block is None:
                break
            matched.append(block)
        for block in matched:
            self._holders[block] += 1
            self._idle.pop(block, None)
        return matched

    def index(self, tokens: list[int], blocks: list[int], computed: int, digests: list[bytes]) -> None:
        """Index the full blocks of a request whose first `computed` positions (of `tokens`) are in
        the cache. `digests` holds those of its blocks already indexed and grows by the new ones; a
        prefix already indexed under another block keeps that block."""
        first = len(digests)
        full = computed // self.block_size
        if full <= first:
            return
        start = digests[-1] if digests else b""
        new = block_digests(tokens[first * self.block_size : full * self.block_size], self.block_size, start)
        for block, digest in zip(blocks[first:full], new):
            if digest not in self._block_of and block not in self._digest_of:
                self._block_of[digest] = block
                self._digest_of[block] = digest
        digests += new

