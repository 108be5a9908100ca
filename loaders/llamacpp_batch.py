"""Continuous batching for llama.cpp: several sequences in one context, decoded together.

The context is made with ``n_seq_max`` = the model's batch size and a KV cache per sequence (see
``_make_context_batched`` for why not one shared cache). Each sequence has a slot: a llama.cpp
sequence id, the tokens whose keys and values are in its cache, and, while it generates, its own
sampler chain with its own seed.

One step is one ``llama_decode``: the next token of every generating sequence, then a chunk of
the prompts being read (chunked prefill, as llama.cpp's server and vLLM do): the shortest left to
read first, so a short question is read at once beside a long document. A prompt read alone
takes up to ``n_batch`` tokens a step (fastest), as many as take about ``ALONE_STEP_S`` (a request
that comes meanwhile waits for the step: deep in a long prompt, on one thread, 512 tokens took
seconds); while other sequences run, a step's prompt tokens are capped so that a step takes about
``STEP_TARGET_S``, and everyone's next token comes that often. Both from the prompt tokens a
second measured on the last step (attention over a long context makes each token dearer). A slot keeps its cache after its sequence ends, so the next turn of a
chat, which starts with the same tokens, only reads what is new: a new request takes the free slot
whose cache shares the longest start with its prompt, else the one least recently used.

Prompts read once: a sequence whose prompt another slot holds (a finished one, or a request
still running) gets that slot's cache copied into its own (``llama_memory_seq_cp``, the whole
per-sequence cache) instead of reading it again; the ``n`` choices of one request, added together,
wait for the first to read the prompt, then copy it. Each then reads only the prompt's last token,
for logits of its own.

Room: a prompt is cut to fit its slot's context and ``max_new_tokens`` to the room left, so
``llama_decode`` never runs out of cells mid-reply.

``llama_cpp`` is imported inside functions only.
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loadstar import BadRequestError, OutputSpec, SamplingParams, SequenceStep, StreamPiece, TokenChoice, TokenLogprob

if TYPE_CHECKING:
    from loadstar.loaders.llamacpp_loader import LlamaCppModel

PENALTY_LAST_N = 64  # tokens the repetition penalties look back over (llama-cpp-python's default)
MIN_SHARED = 16  # prompt tokens another slot must hold beyond a slot's own before its cache is copied
STEP_TARGET_S = 0.4  # a shared step's prompt chunk is sized to take about this long
ALONE_STEP_S = 0.8  # and a step that reads a prompt alone, at most this long (up to n_batch tokens)
MIN_CHUNK = 16  # prompt tokens a step reads at least (a long prompt always moves on)
MIN_MEASURED = 64  # prompt tokens a step must read to measure the rate (a few are mostly overhead)
FIRST_SHARED_CHUNK = 128  # a shared step's prompt tokens before any step was measured


@dataclass
class _Sequence:
    """A generating sequence: its prompt, sampler and the text decoded so far."""

    key: int
    tokens: list[int]  # the prompt
    max_new: int
    sampler: Any  # llama_cpp._internals.LlamaSampler
    ban_eos: bool
    special: bool
    logprobs: int | None = None  # alternatives to give per token (None: no log probabilities)
    fed: int = 0  # prompt tokens whose KV is in the cache
    last: int | None = None  # the sampled token, read at the next step
    generated: int = 0
    pending: int = 0  # tokens not yet shown (a character cut between two tokens)
    previous: list[int] = field(default_factory=list)  # for detokenizing with the right spacing
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    follows: _Slot | None = None  # the slot reading the same prompt: its cache is copied when it is read


@dataclass
class _Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV is in the cache for this seq_id
    sequence: _Sequence | None = None
    used: int = 0  # when it last started a sequence (least recently used slots are reused first)


class LlamaCppBatch:
    """The ``DecodeBatch`` of one loaded llama.cpp model (one per model: it owns the context's slots)."""

    def __init__(self, model: LlamaCppModel, slots: int) -> None:
        from llama_cpp import _internals

        self._model = model
        self._native = model.native
        self._llm = model.native.llm
        self._n_batch = self._native.n_batch
        self._n_ctx = model.info.context_length or self._native.n_ctx  # each sequence's
        self._batch = _internals.LlamaBatch(n_tokens=self._n_batch, embd=0, n_seq_max=1, verbose=False)
        self._slots = [_Slot(i) for i in range(slots)]
        self._by_key: dict[int, _Slot] = {}
        self._clock = 0
        self._pieces: dict[int, bytes] = {}  # token id -> its bytes, for log probabilities
        self._rate: float | None = None  # prompt tokens a second, measured on the last step that read some
        self._copied: set[int] = set()  # seq ids given a copy since the last decode (not a source until then)
        self.prompt_tokens_read = 0  # prompt tokens decoded since the batch was made (what sharing saves)

    def _prompt_budget(self, shared: bool, generating: int) -> int:
        """Prompt tokens the next step reads: sized to take about ``STEP_TARGET_S`` beside other
        sequences, at most ``ALONE_STEP_S`` alone, never more than ``n_batch`` nor fewer than
        ``MIN_CHUNK``."""
        room = self._n_batch - generating
        if self._rate is None:
            return max(MIN_CHUNK, min(room, FIRST_SHARED_CHUNK)) if shared else room
        return max(MIN_CHUNK, min(room, int(self._rate * (STEP_TARGET_S if shared else ALONE_STEP_S))))

    # -- DecodeBatch ---------------------------------------------------------------------------

    def add(
        self, key: int, prompt: str, params: SamplingParams, *, seed: int, output: OutputSpec | None = None
    ) -> None:
        free = [s for s in self._slots if s.sequence is None]
        if not free:
            raise RuntimeError(f"the batch is full ({len(self._slots)} requests)")
        tokens = self._model.fit_prompt(self._model.encode(prompt), params)
        if not tokens:
            raise ValueError("the prompt is empty after tokenizing")
        room = self._n_ctx - len(tokens)
        output = output or OutputSpec()
        sequence = _Sequence(
            key=key, tokens=tokens, max_new=max(0, min(params.max_new_tokens, room)),
            sampler=self._sampler(params, seed, output.json_schema), ban_eos=params.ban_eos,
            special=not params.skip_special_tokens, logprobs=output.logprobs, previous=list(tokens),
        )
        shared = {s.seq_id: _common_prefix(s.cached, tokens) for s in self._slots}
        slot = max(free, key=lambda s: (shared[s.seq_id], -s.used))
        cached = shared[slot.seq_id]
        others = [s for s in self._slots if s is not slot and s.seq_id not in self._copied]
        source = max(others, key=lambda s: shared[s.seq_id], default=None)
        # The same prompt being read by another (maybe partly read, in chunks): wait for it and copy
        # its whole cache then, rather than copy the part read so far and read the rest again.
        reading = next((s for s in others if s.sequence is not None and s.sequence.tokens == tokens
                        and s.sequence.follows is None and s.sequence.last is None), None)
        if reading is not None and len(tokens) - cached >= MIN_SHARED:
            sequence.follows = reading
        elif source is not None and shared[source.seq_id] >= cached + MIN_SHARED:
            cached = self._copy(source, slot, shared[source.seq_id])
        cached = min(cached, len(tokens) - 1)  # the last prompt token is read again: logits to sample from
        self._forget(slot, cached)
        sequence.fed = cached
        self._model.prompt_tokens_evaluated = len(tokens) - cached
        self._clock += 1
        slot.sequence, slot.used = sequence, self._clock
        self._by_key[key] = slot

    def step(self) -> dict[int, SequenceStep]:
        import llama_cpp

        active = [s for s in self._slots if s.sequence is not None]
        if not active:
            return {}
        results: dict[int, SequenceStep] = {}
        for slot in active:  # nothing to generate (no room or max_new_tokens = 0)
            if slot.sequence is not None and slot.sequence.max_new == 0:
                results[slot.sequence.key] = SequenceStep(done=True)
                self._finish(slot)
        for slot in active:
            self._follow(slot)
        batch = self._batch.batch
        batch.n_tokens = 0
        outputs: list[tuple[_Slot, int]] = []

        def put(slot: _Slot, token: int, logits: bool) -> None:
            i = batch.n_tokens
            batch.token[i] = token
            batch.pos[i] = len(slot.cached)
            batch.seq_id[i][0] = slot.seq_id
            batch.n_seq_id[i] = 1
            batch.logits[i] = logits
            batch.n_tokens = i + 1
            slot.cached.append(token)
            if logits:
                outputs.append((slot, i))

        generating = [s for s in self._slots if s.sequence is not None and s.sequence.last is not None]
        for slot in generating:
            assert slot.sequence is not None and slot.sequence.last is not None
            put(slot, slot.sequence.last, True)
        def left(slot: _Slot) -> int:
            assert slot.sequence is not None
            return len(slot.sequence.tokens) - slot.sequence.fed

        reading = sorted((s for s in self._slots if s.sequence is not None and s.sequence.last is None
                          and s.sequence.follows is None),
                         key=lambda s: (left(s), s.used))  # the shortest first: a short question is not held up
        shared = len(generating) + len(reading) > 1
        budget = self._prompt_budget(shared, len(generating))
        read = 0
        for slot in reading:
            sequence = slot.sequence
            assert sequence is not None
            take = min(budget - read, self._n_batch - batch.n_tokens, left(slot))
            for token in sequence.tokens[sequence.fed : sequence.fed + take]:
                sequence.fed += 1
                put(slot, token, sequence.fed == len(sequence.tokens))
            read += take
            if read >= budget or batch.n_tokens >= self._n_batch:
                break
        if batch.n_tokens == 0:
            return results
        started = time.perf_counter()
        self.prompt_tokens_read += read
        code = llama_cpp.llama_decode(self._native.ctx, batch)
        self._copied.clear()  # the copies queued before this decode are done
        if read >= MIN_MEASURED:  # how fast prompt tokens are read now (the next steps' budgets)
            self._rate = read / max(time.perf_counter() - started, 1e-3)
        if code != 0:
            for slot in active:  # what their caches hold is unknown now: start them afresh
                self._forget(slot, 0)
            raise RuntimeError(f"llama_decode returned {code}" + (" (no room left in the KV cache)" if code == 1 else ""))
        vocab = self._native.vocab
        for slot, index in outputs:
            sequence = slot.sequence
            assert sequence is not None
            if sequence.logprobs is not None:  # read before sampling: the logits are the model's own
                logits = self._logits(index)
            token = llama_cpp.llama_sampler_sample(sequence.sampler.sampler, self._native.ctx, index)
            if llama_cpp.llama_vocab_is_eog(vocab, token) and not sequence.ban_eos:
                results[sequence.key] = SequenceStep(
                    StreamPiece("", sequence.pending, tuple(sequence.pending_logprobs)), done=True)
                self._finish(slot)
                continue
            if sequence.logprobs is not None:
                sequence.pending_logprobs.append(self._token_logprob(logits, token, sequence.logprobs))
            sequence.generated += 1
            sequence.pending += 1
            text = sequence.decoder.decode(
                self._llm.detokenize([token], prev_tokens=sequence.previous, special=sequence.special))
            sequence.previous.append(token)
            sequence.last = token
            done = sequence.generated >= sequence.max_new
            if text or done:  # a token that ends inside a character waits for the next one
                results[sequence.key] = SequenceStep(
                    StreamPiece(text, sequence.pending, tuple(sequence.pending_logprobs)), done=done)
                sequence.pending = 0
                sequence.pending_logprobs.clear()
            if done:
                self._finish(slot)
        return results

    def remove(self, key: int) -> None:
        slot = self._by_key.get(key)
        if slot is not None:
            self._finish(slot)

    def close(self) -> None:
        for slot in list(self._by_key.values()):
            self._finish(slot)

    # -- cache ---------------------------------------------------------------------------------

    def clear(self) -> None:
        """Drop every cached prefix and everything else in the context's KV cache (nothing may be
        generating): after anything wrote to the context behind the slots' backs."""
        import llama_cpp

        self.close()
        llama_cpp.llama_memory_clear(self._native.memory, True)
        for slot in self._slots:
            slot.cached.clear()

    def free(self) -> None:
        self.close()
        self._batch.close()

    def _copy(self, source: _Slot, slot: _Slot, shared: int) -> int:
        """Give ``slot`` a copy of ``source``'s whole cache (llama.cpp copies a per-sequence cache
        whole, at the next decode) and keep its first ``shared`` tokens; how many that is."""
        import llama_cpp

        llama_cpp.llama_memory_seq_cp(self._native.memory, source.seq_id, slot.seq_id, -1, -1)
        slot.cached = list(source.cached)
        self._copied.add(slot.seq_id)
        return shared

    def _follow(self, slot: _Slot) -> None:
        """A sequence waiting for another slot to read its prompt: copy that slot's cache once it has
        (then read the last token alone), or read the prompt itself when that sequence went away."""
        sequence = slot.sequence
        if sequence is None or sequence.follows is None:
            return
        leader = sequence.follows
        if leader.sequence is None or leader.sequence.tokens != sequence.tokens:  # it left before reading it all
            sequence.follows = None
            return
        if leader.sequence.last is None or leader.seq_id in self._copied:
            return  # still reading
        sequence.follows = None
        keep = self._copy(leader, slot, len(sequence.tokens) - 1)
        self._forget(slot, keep)
        sequence.fed = keep

    def _forget(self, slot: _Slot, keep: int) -> None:
        """Drop the slot's cache past its first ``keep`` tokens."""
        import llama_cpp

        if len(slot.cached) > keep:
            llama_cpp.llama_memory_seq_rm(self._native.memory, slot.seq_id, keep, -1)
            del slot.cached[keep:]

    def _finish(self, slot: _Slot) -> None:
        sequence, slot.sequence = slot.sequence, None
        if sequence is None:
            return
        self._by_key.pop(sequence.key, None)
        sequence.sampler.close()

    # -- log probabilities ---------------------------------------------------------------------

    def _logits(self, index: int) -> Any:
        import llama_cpp
        import numpy as np

        pointer = llama_cpp.llama_get_logits_ith(self._native.ctx, index)
        logits = np.ctypeslib.as_array(pointer, shape=(self._llm.n_vocab(),)).astype(np.float64)
        peak = logits.max()
        return logits - (peak + np.log(np.exp(logits - peak).sum()))  # log-softmax

    def _token_logprob(self, logprobs: Any, token: int, top: int) -> TokenLogprob:
        import numpy as np

        def choice(t: int) -> TokenChoice:
            piece = self._piece(t)
            return TokenChoice(piece.decode("utf-8", errors="replace"), piece, float(logprobs[t]))

        best: list[int] = []
        if top:
            ids = np.argpartition(-logprobs, top)[:top]
            best = sorted((int(i) for i in ids), key=lambda i: -logprobs[i])
        return TokenLogprob(choice(token), tuple(choice(i) for i in best))

    def _piece(self, token: int) -> bytes:
        """A token's bytes, special tokens written out (llama-cpp-python's token_to_piece pads to 32)."""
        import ctypes

        import llama_cpp

        piece = self._pieces.get(token)
        if piece is None:
            size = 64
            while True:
                buffer = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_token_to_piece(self._native.vocab, token, buffer, size, 0, True)
                if n >= 0:
                    break
                size = -n
            piece = self._pieces[token] = buffer.raw[:n]
        return piece

    # -- sampling ------------------------------------------------------------------------------

    def _sampler(self, params: SamplingParams, seed: int, json_schema: Any = None) -> Any:
        """The sampler chain llama-cpp-python builds for ``generate``, with this sequence's own seed
        and, for a JSON reply, a grammar made from its schema (after the penalties, as there)."""
        from llama_cpp import _internals

        llm = self._llm
        sampler = _internals.LlamaSampler()
        if params.ban_eos and llm.token_eos() >= 0:
            sampler.add_logit_bias(llm.n_vocab(), {llm.token_eos(): float("-inf")})
        sampler.add_penalties(n_vocab=llm.n_vocab(), penalty_last_n=PENALTY_LAST_N,
                              penalty_repeat=params.repetition_penalty, penalty_freq=params.frequency_penalty,
                              penalty_present=params.presence_penalty)
        if json_schema is not None:
            try:
                self._add_grammar(sampler, json_schema)
            except BaseException:
                sampler.close()
                raise
        if params.greedy:
            sampler.add_greedy()
        else:
            sampler.add_top_k(params.top_k)
            sampler.add_typical(params.typical_p, 1)
            sampler.add_top_p(params.top_p, 1)
            sampler.add_min_p(params.min_p, 1)
            sampler.add_temp(params.temperature)
            sampler.add_dist(seed)
        return sampler


    def _add_grammar(self, sampler: Any, json_schema: Any) -> None:
        """A grammar sampler for ``json_schema`` (llama.cpp's converter; no remote $ref is fetched)."""
        import json

        import llama_cpp
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        try:
            grammar = json_schema_to_gbnf(json.dumps(json_schema))
        except RecursionError:
            raise BadRequestError("the JSON schema is nested too deeply for a grammar") from None
        except Exception as error:
            raise BadRequestError(f"llama.cpp cannot make a grammar of this JSON schema: {str(error) or type(error).__name__}") from None
        pointer = llama_cpp.llama_sampler_init_grammar(self._native.vocab, grammar.encode("utf-8"), b"root")
        if not pointer:
            raise BadRequestError("llama.cpp could not compile the grammar made from this JSON schema")
        llama_cpp.llama_sampler_chain_add(sampler.sampler, pointer)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
