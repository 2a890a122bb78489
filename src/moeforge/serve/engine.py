"""The serving engine: requests in, tokens out, one forward of the running batch per `step`.

    engine = Engine(model, EngineConfig(), eos_id)
    engine.add_request("a", prompt_tokens, SamplingParams(max_tokens=32))
    while engine.has_work:
        for output in engine.step(): ...

Each step the scheduler picks the requests and their token counts (`scheduler.py`), their tokens run
through the model as rows over the paged cache, one forward per group of similar lengths (`rows.py`;
compiled with `EngineConfig.compile`), and each request
whose fed tokens reach its newest one samples its next token with its own generator — so a seeded
request produces the same tokens whatever else shares its batch — or, when speculating, keeps the
drafts the model accepts (`speculation.py`). While every running request decodes and no waiting one
could join, a step runs several forwards, each feeding back the tokens the last chose
(`decode_burst.py`). Log-probabilities are the model's log-softmax, before
temperature and filtering: the trainer's forward gives the same numbers.

Not thread-safe: one thread calls everything (`async_engine.py` owns that thread for the server).
"""

from __future__ import annotations

import random

import torch

from moeforge.infer.generate import token_probabilities
from moeforge.model.transformer import Transformer
from moeforge.serve.block_pool import BlockPool
from moeforge.serve.decode_burst import burst_rows, run_burst
from moeforge.serve.paged_cache import attach_paged_caches, blocks_for
from moeforge.serve.requests import (
    EngineConfig,
    EngineStats,
    RequestError,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from moeforge.serve.rows import Segment, StepForward, forward_segments
from moeforge.serve.scheduler import Scheduled, Scheduler, Sequence
from moeforge.serve.speculation import Speculator


class Engine:
    def __init__(self, model: Transformer, config: EngineConfig, eos_id: int | None):
        self.model = model.eval()
        self.config = config
        self.eos_id = eos_id
        self.device = model.tok_embeddings.weight.device
        self.lookahead = model.cfg.mtp_depth if config.speculative else 0
        if config.speculative and self.lookahead == 0:
            raise RequestError(
                "--speculative", "this model has model.mtp-depth=0; allowed: a model trained with MTP modules"
            )
        if config.max_step_tokens < config.max_batch * (1 + self.lookahead):
            raise RequestError(
                "--max-step-tokens",
                f"got {config.max_step_tokens}; allowed: at least --max-batch x (1 + drafts) = "
                f"{config.max_batch * (1 + self.lookahead)}",
            )
        self.allocator = BlockPool(config.cache_blocks, config.block_size)
        self.scheduler = Scheduler(
            self.allocator, config.block_size, config.max_batch, config.max_step_tokens
        )
        self.forward = StepForward(config.compile, self.device)
        self.scratch_block = config.cache_blocks  # one block past the pool's: where padding writes
        self.speculator = (
            Speculator(model, config.block_size, self.scratch_block, self.forward.min_rows)
            if self.lookahead
            else None
        )
        self.cache_bytes_per_position = attach_paged_caches(
            model, config.cache_blocks + 1, config.block_size, self.lookahead > 0
        )
        self.forward.warm_up(model, config.block_size, self.scratch_block, config.max_batch)
        self.sequences: dict[str, Sequence] = {}
        self._arrivals = 0
        self._stats = EngineStats(cache_blocks_total=config.cache_blocks)

    # ---- requests in and out

    def add_request(self, request_id: str, prompt_tokens: list[int], params: SamplingParams) -> None:
        """Queue a request; a one-line RequestError naming the field when it cannot be served."""
        self._check(request_id, prompt_tokens, params)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        sequence = Sequence(
            request_id,
            self._arrivals,
            list(prompt_tokens),
            len(prompt_tokens),
            params,
            torch.Generator(device=self.device).manual_seed(seed),
            prompt_logprobs=[None] if params.prompt_logprobs else None,
            reuses_prefix=self.config.prefix_reuse and not self.lookahead and not params.prompt_logprobs,
        )
        self._arrivals += 1
        self.sequences[request_id] = sequence
        self.scheduler.waiting.append(sequence)
        self._stats.prompt_tokens += len(prompt_tokens)

    def abort(self, request_id: str) -> None:
        """Drop a request (a client gone) and free its blocks now; unknown ids are ignored."""
        sequence = self.sequences.pop(request_id, None)
        if sequence is not None:
            self.scheduler.finish(sequence)

    @property
    def max_seq_len(self) -> int:
        """The model's context: positions one request may hold at most."""
        return self.model.cfg.max_seq_len

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    def stats(self) -> EngineStats:
        stats = self._stats
        stats.running, stats.waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        stats.cache_blocks_used, stats.preemptions = self.allocator.used, self.scheduler.preemptions
        stats.prefix_hit_tokens = self.scheduler.prefix_hit_tokens
        return stats

    def _check(self, request_id: str, prompt_tokens: list[int], params: SamplingParams) -> None:
        cfg = self.model.cfg
        if request_id in self.sequences:
            raise RequestError("request_id", f"{request_id!r} is already being served")
        if not prompt_tokens:
            raise RequestError("prompt", "got an empty prompt; allowed: at least one token")
        if not all(isinstance(t, int) and 0 <= t < cfg.vocab_size for t in prompt_tokens):
            raise RequestError("prompt", f"token ids must be integers in [0, {cfg.vocab_size})")
        if len(prompt_tokens) >= cfg.max_seq_len:
            raise RequestError(
                "prompt",
                f"{len(prompt_tokens)} tokens; allowed: fewer than the context, {cfg.max_seq_len} tokens",
            )
        positions = len(prompt_tokens) + params.max_tokens + self.lookahead
        if positions > cfg.max_seq_len:
            raise RequestError(
                "max_tokens",
                f"got {params.max_tokens}; allowed: at most {cfg.max_seq_len - len(prompt_tokens) - self.lookahead} "
                f"(prompt {len(prompt_tokens)} tokens, context {cfg.max_seq_len})",
            )
        if blocks_for(positions, self.config.block_size) > self.config.cache_blocks:
            raise RequestError(
                "max_tokens",
                f"prompt + max_tokens = {positions} positions exceed the cache "
                f"({self.config.cache_blocks} blocks of {self.config.block_size}, --cache-blocks)",
            )

    # ---- one step

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Schedule, draft (when speculating), run the step's forwards, sample; the outputs of the
        requests that produced tokens or finished."""
        plan = self.scheduler.schedule(self.lookahead)
        if not plan:
            return []
        burst = self._reserve_burst(plan)
        if burst is not None:
            return self._decode_burst([item.sequence for item in plan], burst)
        drafts = self.speculator.draft([s for s in plan if s.speculate]) if self.speculator else {}
        drafted = [drafts.get(item.sequence.request_id) for item in plan]
        hidden = self._forward([self._segment(item, draft) for item, draft in zip(plan, drafted)])
        producing = [i for i, item in enumerate(plan) if self._account(item, hidden[i])]
        # one output-head product and one argmax for every request that produces: its verify rows
        # (the newest token and its drafts) or its newest token's row
        heads = [hidden[i] if drafted[i] is not None else hidden[i][-1:] for i in producing]
        logits = self.model.output(torch.cat(heads)) if heads else None
        choices = logits.argmax(dim=-1).tolist() if heads else []
        outputs, offset = [], 0
        for i, rows in zip(producing, heads):
            span = slice(offset, offset + rows.shape[0])
            offset = span.stop
            outputs.append(self._produce(plan[i].sequence, rows, logits[span], choices[span], drafted[i]))
        for item in plan:
            self._index_computed_blocks(item.sequence)
        self._stats.steps += 1
        return outputs

    def _reserve_burst(self, plan: list[Scheduled]) -> list[int] | None:
        """The forwards each request of a step of decodes feeds in a burst (`decode_burst.py`), their
        blocks taken; or None for a single step: when speculating, while a request prefills or a
        waiting one could join, or when the cache lacks blocks for the burst (single steps preempt;
        bursts do not)."""
        steps = self.config.decode_steps
        scheduler = self.scheduler
        if steps == 1 or self.lookahead or any(item.sequence.remaining != 1 for item in plan):
            return None
        if len(plan) < len(scheduler.running) or (scheduler.waiting and len(scheduler.running) < self.config.max_batch):
            return None
        lengths = [min(steps, s.params.max_tokens - s.generated) for s in (item.sequence for item in plan)]
        if max(lengths) == 1:
            return None
        for item, length in zip(plan, lengths):
            if not scheduler.reserve(item.sequence, len(item.sequence.tokens) + length - 1):
                return None
        return lengths

    def _decode_burst(self, sequences: list[Sequence], lengths: list[int]) -> list[RequestOutput]:
        """Up to `decode_steps` forwards of decoding requests, each request's chosen tokens fed back
        (`decode_burst.py`); request r feeds lengths[r] tokens and produces as many (fewer when a
        stop token comes first)."""
        segments = [Segment([s.tokens[-1]], s.computed, s.blocks) for s in sequences]
        rows = burst_rows(
            segments, lengths, self.config.block_size, self.scratch_block, self.device, self.forward.min_rows
        )
        sampled = [r for r, s in enumerate(sequences) if not s.params.greedy]

        def choose(index: int, logits: torch.Tensor) -> torch.Tensor:
            chosen = logits.argmax(dim=-1)
            for r in sampled:
                if index < lengths[r]:
                    chosen[r] = self._sample(sequences[r], logits[r : r + 1])
            return chosen

        logits, chosen = run_burst(rows, lambda batch: self.forward(self.model, batch), self.model.output, choose)
        tokens = torch.stack(chosen, dim=1).tolist()  # [B, forwards]
        per_request = torch.stack(logits, dim=1)  # [B, forwards, vocab]
        outputs = []
        for r, (sequence, length) in enumerate(zip(sequences, lengths)):
            sequence.computed += length
            outputs.append(self._append(sequence, tokens[r][:length], per_request[r, :length]))
            self._index_computed_blocks(sequence)
        self._stats.steps += rows.length
        return outputs

    def _index_computed_blocks(self, sequence: Sequence) -> None:
        """A request still served after a step: its newly computed full blocks become reusable
        prefixes (`BlockPool.index`); a finished one has released its blocks."""
        if sequence.blocks:
            self.allocator.index(sequence.tokens, sequence.blocks, sequence.computed, sequence.digests)

    def _forward(self, segments: list[Segment]) -> list[torch.Tensor]:
        """Each segment's final hidden states [its tokens, dim], in order."""
        return forward_segments(
            segments,
            lambda batch: self.forward(self.model, batch),
            self.config.block_size,
            self.scratch_block,
            self.device,
            self.forward.min_rows,
        )

    def _segment(self, item: Scheduled, drafted) -> Segment:
        sequence = item.sequence
        fed = sequence.tokens[sequence.computed : sequence.computed + item.tokens]
        if drafted is not None:
            fed = fed + drafted.tokens
        return Segment(fed, sequence.computed, sequence.blocks)

    def _account(self, item: Scheduled, hidden: torch.Tensor) -> bool:
        """Account for the tokens fed (hidden [fed, dim]); whether they reached the newest token, so
        that the request produces its next ones (False: a prefill chunk short of the end)."""
        sequence = item.sequence
        start = sequence.computed
        self._collect_prompt_logprobs(sequence, start, hidden[: item.tokens])
        sequence.computed += item.tokens
        if self.speculator:
            self.speculator.record_hidden(sequence, start, hidden[: item.tokens])
        return sequence.remaining == 0

    def _produce(
        self, sequence: Sequence, hidden: torch.Tensor, logits: torch.Tensor, choices: list[int], drafted
    ) -> RequestOutput:
        """The request's next tokens from its head rows (hidden and logits [rows, ...], `choices` their
        argmaxes): the verify rows' accepted drafts and the model's own token, or one sampled token."""
        if drafted is not None:
            new_tokens = self.speculator.accept(sequence, drafted, logits, hidden, choices)
            self._stats.drafted_tokens += len(drafted.tokens)
            self._stats.accepted_tokens += len(new_tokens) - 1
            self._stats.verify_rounds += 1
        elif sequence.params.greedy:
            new_tokens = choices
        else:
            new_tokens = [self._sample(sequence, logits)]
        return self._append(sequence, new_tokens, logits)

    @staticmethod
    def _sample(sequence: Sequence, logits: torch.Tensor) -> int:
        """A token drawn from the request's filtered distribution of logits [1, vocab], with its
        own generator."""
        probs = token_probabilities(logits, sequence.params.sampling_config())
        return int(torch.multinomial(probs[0], 1, generator=sequence.generator))

    def _append(self, sequence: Sequence, new_tokens: list[int], logits: torch.Tensor) -> RequestOutput:
        """Add new tokens (cut at a stop token or max_tokens), with the log-probabilities of
        `logits` [len(new_tokens) or more, vocab], row j predicting new token j; finish when due."""
        params = sequence.params
        stops = set(params.stop_token_ids) | (
            {self.eos_id} if self.eos_id is not None and not params.ignore_eos else set()
        )
        kept, reason = [], None
        for token in new_tokens:
            kept.append(token)
            if token in stops:
                reason = "stop"
                break
            if sequence.generated + len(kept) >= params.max_tokens:
                reason = "length"
                break
        sequence.tokens += kept
        self._stats.generated_tokens += len(kept)
        output = RequestOutput(sequence.request_id, kept, finish_reason=reason)
        if params.logprobs is not None:
            output.logprobs = token_logprobs(
                logits[: len(kept)], kept, params.logprobs
            )  # row j predicts new token j
        if sequence.prompt_logprobs is not None and not sequence.prompt_logprobs_sent:
            output.prompt_logprobs, sequence.prompt_logprobs_sent = sequence.prompt_logprobs, True
        if reason is not None:
            self.sequences.pop(sequence.request_id, None)
            self.scheduler.finish(sequence)
            self._stats.requests_finished += 1
        return output

    def _collect_prompt_logprobs(self, sequence: Sequence, start: int, hidden: torch.Tensor) -> None:
        """The log-probabilities of the prompt tokens these rows (positions start, ...) predict and
        that are not yet collected: row p predicts token p + 1. A recomputation after a preemption
        may cut its chunks elsewhere, so the rows are matched by position."""
        collected = sequence.prompt_logprobs
        if collected is None or sequence.prompt_logprobs_sent:
            return
        first = len(collected) - 1  # the position whose row predicts the next uncollected token
        last = min(start + hidden.shape[0], sequence.prompt_len - 1)
        if not start <= first < last:
            return
        targets = sequence.tokens[first + 1 : last + 1]
        rows = hidden[first - start : last - start]
        collected += token_logprobs(self.model.output(rows), targets, sequence.params.logprobs or 0)


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Each row's log-softmax at its token [R, vocab] -> R entries, with the `top` most likely tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
    if top:
        values, ids = logprobs.topk(top, dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(tokens)
    return [TokenLogprob(token, value, best) for token, value, best in zip(tokens, chosen, tops)]
