"""A segment-level prefix cache: KV caches of a prompt's leading whole segments, reused across requests.

Under MAS a token sees later tokens only inside its own segment, so the keys and values of a prompt's
leading *whole* segments do not depend on anything after them. Two requests that open with the same
segments (the same system prompt, the same earlier turns) can share them::

    request A   [ system ][ user: "Tell me about a cat." ][ assistant header ]
    request B   [ system ][ user: "And a dog?" ]          [ assistant header ]
                 ^^^^^^^^ cached after A, reused by B: B prefills only its user turn and header

Entries are keyed by the token ids *and* segment ids of those leading tokens (the same tokens segmented
differently are different K/V). A lookup takes the longest stored entry that the new prompt extends,
cut back to where :func:`segmask.masks.reusable_prefix` says it stays exact: no bidirectional
segment may continue past the cut in the new prompt. The entries live in an LRU under a byte cap.

Under the ``prefix`` policy the whole prompt is one segment, so every cached token would have to see the
rest of any new prompt: only an identical prompt could reuse it. The server therefore leaves the cache
off for ``prefix`` requests (see :mod:`segmask.serving`).

Each entry is one row (batch size 1) of a full-attention :class:`transformers.DynamicCache`; lookups
return an independent copy, so a request may extend it in place.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from segmask.masks import cuts, reusable_prefix


def cache_nbytes(cache: DynamicCache) -> int:
    """Bytes held by a cache's key and value tensors."""
    return sum(
        keys.numel() * keys.element_size() + values.numel() * values.element_size()
        for keys, values, _ in cache
    )


def sliced(cache: DynamicCache, length: int, config) -> DynamicCache:
    """An independent copy of a cache's first ``length`` positions (keys and values ``[B, H, length, D]``)."""
    data = [(keys[..., :length, :].clone(), values[..., :length, :].clone()) for keys, values, _ in cache]
    return DynamicCache(data, config=config)


def stack_left_padded(caches: Sequence[DynamicCache], config) -> DynamicCache:
    """Stack one-row caches of different lengths into one batch, left-padded with zeros to the longest.

    Row ``i`` of ``n_i`` positions becomes ``[0] * (N - n_i) + row_i`` in a ``[B, H, N, D]`` cache; the
    caller masks the padding with a 2-D attention mask ``[B, N + ...]`` whose row ``i`` starts with
    ``N - n_i`` zeros, which is how ``generate`` continues left-padded prompts. A row may be empty (a
    one-token prompt has nothing cached).
    """
    lengths = [cache.get_seq_length() for cache in caches]
    longest = max(lengths)
    if longest == 0:
        return DynamicCache(config=config)
    rows = [list(cache) if length else None for cache, length in zip(caches, lengths)]
    template = next(row for row in rows if row is not None)
    data = []
    for layer, (keys, values, _) in enumerate(template):
        padded = []
        for like, part in ((keys, 0), (values, 1)):
            shape = (1, like.shape[1], longest, like.shape[3])
            parts = [
                like.new_zeros(shape)
                if row is None
                else torch.nn.functional.pad(row[layer][part], (0, 0, longest - length, 0))
                for row, length in zip(rows, lengths)
            ]
            padded.append(torch.cat(parts, dim=0))
        data.append((padded[0], padded[1]))
    return DynamicCache(data, config=config)


@dataclass(frozen=True)
class Entry:
    """A stored prefix: its token ids, segment ids and the one-row KV cache of exactly those tokens."""

    input_ids: tuple[int, ...]
    segment_ids: tuple[int, ...]
    cache: DynamicCache
    nbytes: int


@dataclass(frozen=True)
class Hit:
    """A lookup result: ``length`` leading prompt tokens are served by ``cache`` (a private copy)."""

    length: int
    cache: DynamicCache


class PrefixCache:
    """LRU of KV caches of leading whole segments, under ``max_bytes``.

        cache = PrefixCache(model.config, max_bytes=256 << 20)
        hit = cache.lookup(ids, segments)           # None, or Hit(length, cache of ids[:length])
        ...prefill ids[hit.length:] against hit.cache...
        cache.store(ids, segments, prompt_cache)    # keeps the whole leading segments of the prompt

    Only for models whose layers all use full attention (a sliding-window layer keeps no full history).
    Thread-safe; lookups scan the entries (a server holds at most a few hundred).
    """

    def __init__(self, config, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.config = config
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0
        self.lookups = 0
        self._entries: OrderedDict[tuple[tuple[int, ...], tuple[int, ...]], Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, input_ids: Sequence[int], segment_ids: Sequence[int]) -> Hit | None:
        """The longest exact reusable prefix of a prompt, at most ``len(input_ids) - 1`` tokens, or None.

        The last prompt token is never served from the cache: ``generate`` runs it itself (see
        :mod:`segmask.generation`). A shorter reuse than an entry's length is exact: the entry's tokens
        up to the cut saw exactly the tokens of their segments, which the new prompt shares.
        """
        ids, segments = list(input_ids), list(segment_ids)
        with self._lock:
            self.lookups += 1
            best, best_length = None, 0
            for entry in self._entries.values():
                if not entry.input_ids or entry.input_ids[0] != ids[0]:
                    continue
                length = reusable_prefix(list(entry.input_ids), list(entry.segment_ids), ids, segments)
                if length > best_length:
                    best, best_length = entry, length
            best_length = min(best_length, len(ids) - 1)
            if best is None or best_length <= 0:
                return None
            self._entries.move_to_end((best.input_ids, best.segment_ids))
            self.hits += 1
            source = best.cache
        return Hit(best_length, sliced(source, best_length, self.config))

    def store(self, input_ids: Sequence[int], segment_ids: Sequence[int], cache: DynamicCache) -> int:
        """Keep the cache of the prompt's leading whole segments; returns how many tokens that entry holds.

        ``cache`` is a one-row cache of the first ``n`` prompt tokens computed with the whole prompt (a
        cropped prefill); the entry takes its longest prefix of whole segments within ``n``. Entries the
        new one extends are dropped (it serves their requests too); least recently used entries are
        evicted until the cap holds. An entry alone over the cap is not stored.
        """
        held = min(cache.get_seq_length(), len(input_ids))
        length = max((c for c in cuts(segment_ids) if c <= held), default=0)  # whole segments only
        if length == 0 or self.max_bytes == 0:
            return 0
        key = (tuple(input_ids[:length]), tuple(segment_ids[:length]))
        with self._lock:
            for other in list(self._entries):
                if _extends(other, key):  # an existing entry already holds this one: refresh it
                    self._entries.move_to_end(other)
                    return length
        entry_cache = sliced(cache, length, self.config)
        entry = Entry(key[0], key[1], entry_cache, cache_nbytes(entry_cache))
        if entry.nbytes > self.max_bytes:
            return 0
        with self._lock:
            for other in [k for k in self._entries if _extends(key, k)]:
                self.nbytes -= self._entries.pop(other).nbytes
            self._entries[key] = entry
            self.nbytes += entry.nbytes
            while self.nbytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.nbytes -= evicted.nbytes
        return length

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0


def _extends(
    longer: tuple[tuple[int, ...], tuple[int, ...]], shorter: tuple[tuple[int, ...], tuple[int, ...]]
) -> bool:
    """Whether key ``longer`` starts with key ``shorter`` and holds its segments whole (then it serves them)."""
    n = len(shorter[0])
    if len(longer[0]) < n or longer[0][:n] != shorter[0] or longer[1][:n] != shorter[1]:
        return False
    return not {s for s in shorter[1] if s >= 0} & set(longer[1][n:])
