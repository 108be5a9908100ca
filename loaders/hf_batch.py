"""Continuous batching for Hugging Face causal LMs (the Transformers and AutoGPTQ loaders).

The decoding sequences share one KV cache, a row each, padded on the left to the longest: one
forward pass per step gives every row its next token. The attention mask hides each row's padding
and each row has its own positions, so a sequence's tokens do not depend on the others beside it
(tests: greedy answers in a batch are the answers given alone, and alone they are ``generate``'s).

A joining prompt is read into a cache of its own, ``PREFILL_CHUNK`` tokens per step beside the
others' decoding (Stop is checked between chunks). Its first token is sampled from the prompt's
last logits, as ``generate`` does, and the sequence then becomes a row of the shared cache (its
cache padded on the left to the shared one's length, or the shared one to its). A sequence that
ends is dropped from the rows, and columns left holding only padding are cut off.

Log probabilities (``FEATURE_LOGPROBS``, batching models only) are the model's own: a log-softmax
of the raw logits, before the sampling settings, as llama.cpp gives them.

Measured on an H100 (tiny random models of eight architectures): in float32 every greedy reply
in a batch equals ``generate`` alone; in bfloat16, 2 of 32 differed, as half-precision GPU matrix
kernels are chosen by the batch's size and round differently at near-ties (vLLM and TGI say the same
of theirs). On CPU (float32 here) they are equal (tests).

Each sequence samples with its own logits processors (transformers' own, in ``generate``'s order)
and its own ``torch.Generator`` seeded with its seed: a request gets the same reply alone or in
any batch.

Memory: a sequence reserves the keys and values of its prompt and ``max_new_tokens``; one whose
reservation would take the batch past ``KV_SHARE_OF_FREE_MEMORY`` of the memory free waits, in
join order, until others leave (alone, it always starts: it would run alone anyway).

Only a model whose cache is a plain ``DynamicLayer`` per layer batches (``batchable``): sliding
window, hybrid and recurrent caches keep the one-at-a-time path. torch and transformers are
imported inside functions only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from loadstar import OutputSpec, SamplingParams, SequenceStep, StreamPiece, TokenChoice, TokenLogprob
from loadstar.loaders.hf_sampling import PREFILL_CHUNK, PieceStreamer, eos_ids, logits_processors

if TYPE_CHECKING:
    from loadstar.loaders.hf_causal_lm import HFCausalLM

KV_SHARE_OF_FREE_MEMORY = 0.5  # the batch's KV reservations stay within this share of free memory


def batchable(model: Any) -> str | None:
    """None when ``model`` (a transformers model) can decode in this batch, else why not."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return "not a decoder-only transformers model"
    try:
        layers = DynamicCache(config=config).layers
    except Exception as error:  # an architecture whose cache transformers builds otherwise
        return f"its cache cannot be laid out per sequence ({type(error).__name__})"
    odd = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
    if not layers or odd:
        return f"its cache has {', '.join(sorted(odd)) or 'no'} layers, which this batch cannot pad"
    return None


def kv_bytes_per_token(model: Any) -> int | None:
    """Bytes of keys and values one token takes in ``model``'s cache, from its config and dtype."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    try:
        text = config.get_text_config(decoder=True)
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return int(2 * text.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize)
    except (AttributeError, TypeError, ZeroDivisionError):
        return None


@dataclass
class _Sequence:
    key: int
    tokens: list[int]  # the prompt, then each token generated
    prompt_length: int
    max_new: int
    greedy: bool
    processors: Any  # transformers.LogitsProcessorList
    generator: Any  # torch.Generator, seeded with the request's seed
    streamer: Any  # hf_sampling.PieceStreamer
    eos: frozenset[int]
    reserve: int  # bytes of KV cache this sequence may come to hold
    skip_special: bool = True  # special tokens are left out of the text (the end-of-sequence one too)
    logprobs: int | None = None  # alternatives to give per token (None: no log probabilities)
    pieces: list[StreamPiece] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)  # of tokens whose text is not out yet
    cache: Any = None  # its own DynamicCache while its prompt is read
    fed: int = 0  # prompt tokens read
    generated: int = 0


class HFBatch:
    """The ``DecodeBatch`` of one loaded transformers model."""

    def __init__(self, model: HFCausalLM, slots: int) -> None:
        self._model = model
        self._slots = slots
        self._reading: list[_Sequence] = []  # in join order
        self._rows: list[_Sequence] = []  # the shared cache's rows, in order
        self._cache: Any = None  # the shared DynamicCache ([rows, heads, columns, dim] per layer)
        self._mask: Any = None  # [rows, columns]: 1 where a row has a token, 0 for its padding
        self._per_token = kv_bytes_per_token(model.model)
        self._byte_level = _is_byte_level(model.tokenizer)

    # -- DecodeBatch ---------------------------------------------------------------------------

    def add(
        self, key: int, prompt: str, params: SamplingParams, *, seed: int, output: OutputSpec | None = None
    ) -> None:
        import torch

        if len(self._reading) + len(self._rows) >= self._slots:
            raise RuntimeError(f"the batch is full ({self._slots} requests)")
        model = self._model
        ids = model.fit_prompt(model.encode(prompt), params)
        if not ids:
            raise ValueError("the prompt is empty after tokenizing")
        context = model.info.context_length
        max_new = max(0, min(params.max_new_tokens, context - len(ids))) if context else params.max_new_tokens
        eos = eos_ids(model.model, model.tokenizer)
        device = model.model.device
        sequence = _Sequence(
            key=key, tokens=list(ids), prompt_length=len(ids), max_new=max_new, greedy=params.greedy,
            processors=logits_processors(params, len(ids), eos),
            generator=None if params.greedy else torch.Generator(device=device).manual_seed(seed),
            streamer=None, eos=frozenset(eos), reserve=(self._per_token or 0) * (len(ids) + max_new),
            skip_special=params.skip_special_tokens, logprobs=output.logprobs if output is not None else None,
        )
        sequence.streamer = PieceStreamer(model.tokenizer, sequence.pieces.append,
                                           skip_special_tokens=params.skip_special_tokens, prompt_seen=True)
        self._reading.append(sequence)

    def step(self) -> dict[int, SequenceStep]:
        results: dict[int, SequenceStep] = {}
        for sequence in [s for s in self._reading if s.max_new == 0]:  # no room, or max_new_tokens = 0
            self._reading.remove(sequence)
            results[sequence.key] = SequenceStep(done=True)
        if self._rows:
            self._decode(results)
        if self._reading and self._room_for(self._reading[0]):
            self._read(self._reading[0], results)
        return results

    def remove(self, key: int) -> None:
        self._reading = [s for s in self._reading if s.key != key]
        self._drop({key})

    def close(self) -> None:
        self._reading.clear()
        self._drop({s.key for s in self._rows})

    # -- steps ---------------------------------------------------------------------------------

    def _decode(self, results: dict[int, SequenceStep]) -> None:
        """One token for every row, in one forward pass over the shared cache."""
        import torch

        device = self._model.model.device
        rows = len(self._rows)
        columns = self._mask.shape[1]
        mask = torch.cat([self._mask, torch.ones((rows, 1), dtype=self._mask.dtype, device=device)], dim=1)
        with torch.inference_mode():
            out = self._model.model(
                input_ids=torch.tensor([[s.tokens[-1]] for s in self._rows], device=device),
                attention_mask=mask,
                position_ids=torch.tensor([[len(s.tokens) - 1] for s in self._rows], device=device),
                past_key_values=self._cache, use_cache=True,
                cache_position=torch.tensor([columns], device=device),
            )
            self._mask = mask
            logits = out.logits[:, -1, :].float()
            ended = set()
            for i, sequence in enumerate(self._rows):
                if self._accept(sequence, self._choose(sequence, logits[i : i + 1]), results):
                    ended.add(sequence.key)
        self._drop(ended)

    def _read(self, sequence: _Sequence, results: dict[int, SequenceStep]) -> None:
        """The next chunk of a joining prompt; after its last, the first token, and a row."""
        import torch
        from transformers import DynamicCache

        model = self._model.model
        if sequence.cache is None:
            sequence.cache = DynamicCache(config=model.config)
        start, end = sequence.fed, min(sequence.fed + PREFILL_CHUNK, sequence.prompt_length)
        with torch.inference_mode():
            out = model(
                input_ids=torch.tensor([sequence.tokens[start:end]], device=model.device),
                attention_mask=torch.ones((1, end), dtype=torch.long, device=model.device),
                position_ids=torch.arange(start, end, device=model.device).unsqueeze(0),
                past_key_values=sequence.cache, use_cache=True,
                cache_position=torch.arange(start, end, device=model.device), logits_to_keep=1,
            )
            sequence.fed = end
            if end < sequence.prompt_length:
                return
            self._reading.remove(sequence)
            if self._accept(sequence, self._choose(sequence, out.logits[:, -1, :].float()), results):
                sequence.cache = None
                return
        self._join(sequence)

    def _choose(self, sequence: _Sequence, logits: Any) -> int:
        import torch

        raw = logits
        if sequence.processors:
            logits = sequence.processors(torch.tensor([sequence.tokens], device=logits.device), logits.clone())
        if sequence.greedy:
            token = int(torch.argmax(logits, dim=-1).item())
        else:
            probabilities = torch.softmax(logits, dim=-1)
            token = int(torch.multinomial(probabilities, 1, generator=sequence.generator).item())
        if sequence.logprobs is not None:
            sequence.pending_logprobs.append(self._token_logprob(raw[0], token, sequence.logprobs))
        return token

    def _token_logprob(self, logits: Any, token: int, top: int) -> TokenLogprob:
        import torch

        logprobs = torch.log_softmax(logits.double(), dim=-1)

        def choice(t: int) -> TokenChoice:
            piece = _token_bytes(self._model.tokenizer, t, self._byte_level)
            return TokenChoice(piece.decode("utf-8", errors="replace"), piece, float(logprobs[t]))

        best = torch.topk(logprobs, top).indices.tolist() if top else []
        return TokenLogprob(choice(token), tuple(choice(int(i)) for i in best))

    def _accept(self, sequence: _Sequence, token: int, results: dict[int, SequenceStep]) -> bool:
        """Add ``token`` to ``sequence``, put its text in ``results``; True when the sequence ended."""
        import torch

        end = token in sequence.eos
        if end and sequence.skip_special:  # as llama.cpp's batch: no text, not counted, no log probability
            if sequence.logprobs is not None:
                sequence.pending_logprobs.pop()
        else:  # shown when special tokens are asked for, as generate's streamer shows it
            sequence.tokens.append(token)
            sequence.generated += 1
            sequence.streamer.put(torch.tensor([token]))
        done = end or sequence.generated >= sequence.max_new
        if done:
            sequence.streamer.end()
        if sequence.pieces or done:
            # the tokens' log probabilities go with the text they make (a piece may carry several)
            piece = StreamPiece("".join(p.text for p in sequence.pieces), sum(p.tokens for p in sequence.pieces),
                                tuple(sequence.pending_logprobs))
            results[sequence.key] = SequenceStep(piece if sequence.pieces else None, done=done)
            sequence.pieces.clear()
            sequence.pending_logprobs.clear()
        return done

    # -- the shared cache ----------------------------------------------------------------------

    def _join(self, sequence: _Sequence) -> None:
        """Make ``sequence``'s own cache a row of the shared one, padding whichever is shorter."""
        import torch

        own, sequence.cache = sequence.cache, None
        length = own.get_seq_length()
        own_mask = torch.ones((1, length), dtype=torch.long, device=self._model.model.device)
        if self._cache is None:
            self._cache, self._mask, self._rows = own, own_mask, [sequence]
            return
        columns = self._mask.shape[1]
        width = max(columns, length)
        for shared, layer in zip(self._cache.layers, own.layers, strict=True):
            shared.keys = torch.cat([_pad_left(shared.keys, width - columns), _pad_left(layer.keys, width - length)])
            shared.values = torch.cat([_pad_left(shared.values, width - columns), _pad_left(layer.values, width - length)])
        self._mask = torch.cat([_pad_mask(self._mask, width - columns), _pad_mask(own_mask, width - length)])
        self._rows.append(sequence)

    def _drop(self, keys: set[int]) -> None:
        """Remove these rows, and the columns that then hold only padding."""
        import torch

        keep = [i for i, s in enumerate(self._rows) if s.key not in keys]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        first = int(mask.any(dim=0).nonzero()[0].item())  # the first column any row still uses
        self._mask = mask[:, first:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:, :]
            layer.values = layer.values.index_select(0, index)[:, :, first:, :]

    # -- memory --------------------------------------------------------------------------------

    def _room_for(self, sequence: _Sequence) -> bool:
        """Whether ``sequence`` may start reading its prompt now (see the module docstring)."""
        # started: a row, or reading its prompt into its own cache
        running = self._rows + [s for s in self._reading if s.cache is not None]
        if sequence.cache is not None or not running or not sequence.reserve:
            return True
        held = self._held_bytes()
        reserved = sum(s.reserve for s in running)
        return reserved + sequence.reserve <= KV_SHARE_OF_FREE_MEMORY * (_free_memory(self._model.model) + held)

    def _held_bytes(self) -> int:
        caches = [self._cache] + [s.cache for s in self._reading]
        return sum(layer.keys.nbytes + layer.values.nbytes for cache in caches if cache is not None
                   for layer in cache.layers if getattr(layer, "keys", None) is not None)


def _token_bytes(tokenizer: Any, token: int, byte_level: bool) -> bytes:
    """A token's bytes: byte-level BPE's stand-in characters mapped back to bytes, SentencePiece's
    byte tokens (``<0x0A>``) and word marks undone, special tokens written out."""
    import re

    text = tokenizer.convert_ids_to_tokens(token)
    if not isinstance(text, str):
        return b""
    if token in getattr(tokenizer, "all_special_ids", ()):
        return text.encode("utf-8")
    if byte_level:
        decoder = _byte_decoder()
        if all(c in decoder for c in text):
            return bytes(decoder[c] for c in text)
        return text.encode("utf-8")
    byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", text)
    if byte:
        return bytes([int(byte.group(1), 16)])
    return text.replace("\u2581", " ").encode("utf-8")


def _is_byte_level(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` is byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM), by its decoder."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    return "ByteLevel" in repr(decoder)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE writes each byte as a printable character (GPT-2's table): that table, reversed."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins = {b: b for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in stand_ins):
        stand_ins[b] = 256 + n
    return {chr(c): b for b, c in stand_ins.items()}


def _pad_left(tensor: Any, columns: int) -> Any:
    """Keys or values ([rows, heads, columns, dim]) with ``columns`` zero columns in front."""
    import torch.nn.functional as F

    return F.pad(tensor, (0, 0, columns, 0)) if columns else tensor


def _pad_mask(mask: Any, columns: int) -> Any:
    import torch.nn.functional as F

    return F.pad(mask, (columns, 0)) if columns else mask


def _free_memory(model: Any) -> int:
    device = getattr(model, "device", None)
    if device is not None and device.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)
