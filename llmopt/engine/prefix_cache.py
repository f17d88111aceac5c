"""Prompt (prefix) caching: keep the KV of prompts already seen and prefill only the part of a new prompt
that no earlier prompt shares.

The design document (section 4) sketches a text-keyed `PromptCacheManager` with LRU eviction, a TTL, memory
limits and invalidation. Here the cache is keyed on **token ids**, as serving engines do, so the longest
cached prefix is reused even when a prompt shares only part of it.

Structure: a **radix tree** (SGLang's RadixAttention, Zheng et al. 2024), not vLLM's block-hash chain. Each
node holds a run of tokens and their KV (one tensor [2 (keys, values), layers, Hkv, n, D] per node); a path
from the root spells a cached prefix. Why a tree here: a batch-1 decoder gains from *token-exact* reuse (a
block-hash chain reuses whole blocks only, so the tail of a 250-token prefix that fills no 16-token block is
recomputed), a shared system prompt is stored once however many prompts extend it, and a prefix's KV comes
back as a few contiguous runs (one per node) instead of one tensor per block. The price is splitting a node
when a new prompt diverges inside it (its KV is cut in two, bytes unchanged).

Invariants:
- Memory: `used_bytes` (the bytes of all stored KV tensors) never exceeds `max_bytes`. An insertion evicts
  first and copies after; a prompt whose new part cannot fit (larger than the limit, or only by evicting the
  prefix it extends) is not stored (`rejected` counts it).
- LRU: nodes live in an ordered dict by last use; a use touches the node and then its ancestors, so every node
  comes after its descendants and the front is always the least recently used *leaf*. Eviction pops leaves
  only (a node's KV is worthless without its ancestors').
- TTL: an entry unused for `ttl_s` seconds (by the injectable `clock`) is expired: removed before any lookup
  or insertion, so it is never served. Ancestors are used whenever descendants are, so they expire no earlier.
- Invalidation: every call carries the fingerprint of the model that computes the KV (`model_fingerprint`:
  configuration, dtype, device, attention backend, tensor names/shapes and sampled weight values). A call
  with another fingerprint empties the cache first, so a cache filled under one model never serves another.

Assumes batch 1, KV per layer shaped [1, Hkv, n, D] (llmopt.engine.kv_cache), and a clock that does not go back.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..errors import InvalidParameterError


def model_fingerprint(model, sampled_tensors: int = 8, samples_per_tensor: int = 64) -> str:
    """A hash of what determines the KV a model computes for a token sequence.

    Configuration, attention backend, every parameter's and buffer's name, shape, dtype and device, and
    `samples_per_tensor` evenly spaced values from `sampled_tensors` tensors spread over the model (reloaded,
    fine-tuned or quantized weights change them). A heuristic, as any cheap weights hash is: an edit to
    unsampled elements only goes unseen. One device-to-host copy; a few milliseconds for the default model."""
    digest = hashlib.sha256()
    config = model.config
    digest.update(repr(dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config).encode())
    digest.update(repr(getattr(model, "attention_backend", None)).encode())
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    digest.update(repr([(name, tuple(t.shape), t.dtype, t.device) for name, t in tensors]).encode())
    picks = [tensors[i][1] for i in torch.linspace(0, len(tensors) - 1, sampled_tensors).long().unique().tolist()]
    samples = []
    for tensor in picks:
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        samples.append(flat[::step][:samples_per_tensor].to(torch.float64))
    digest.update(torch.cat(samples).cpu().numpy().tobytes())
    return digest.hexdigest()


@dataclass(eq=False)
class Node:
    """A run of tokens and their KV ([2 (keys, values), layers, Hkv, n, D]); the root holds none."""
    tokens: tuple[int, ...] = ()
    kv: torch.Tensor | None = None
    parent: "Node | None" = None
    children: dict[int, "Node"] = field(default_factory=dict)  # first token of the child's run -> child
    last_used_s: float = 0.0

    @property
    def kv_bytes(self) -> int:
        return 0 if self.kv is None else self.kv.numel() * self.kv.element_size()


@dataclass
class PrefixHit:
    """The longest cached prefix of a prompt: its length and per-layer KV ([1, Hkv, length, D] each)."""
    length: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


class PrefixCache:
    """A token-keyed radix tree of KV with LRU eviction, a TTL and a byte limit (see the module docstring)."""

    def __init__(self, max_bytes: int, ttl_s: float = float("inf"), clock: Callable[[], float] = time.monotonic):
        if max_bytes <= 0:
            raise InvalidParameterError(f"max_bytes must be positive, got {max_bytes}")
        if not ttl_s > 0:
            raise InvalidParameterError(f"ttl_s must be positive, got {ttl_s}")
        self.max_bytes, self.ttl_s, self.clock = int(max_bytes), float(ttl_s), clock
        self.fingerprint: str | None = None
        self.hits = self.misses = self.reused_tokens = self.looked_up_tokens = 0
        self.stored_tokens = self.evicted_tokens = self.expired_tokens = self.rejected = self.invalidations = 0
        self._clear()

    # ---- state -------------------------------------------------------------------------------------------
    def _clear(self) -> None:
        self.root = Node()
        self.lru: OrderedDict[int, Node] = OrderedDict()  # id(node) -> node, least recently used first
        self.used_bytes = 0

    @property
    def requests(self) -> int:
        return self.hits + self.misses

    @property
    def cached_tokens(self) -> int:
        """Tokens whose KV is held (a shared prefix counts once)."""
        return sum(len(n.tokens) for n in self.lru.values())

    @property
    def num_nodes(self) -> int:
        return len(self.lru)

    def stats(self) -> dict:
        return {"requests": self.requests, "hits": self.hits, "misses": self.misses,
                "hit_rate": self.hits / self.requests if self.requests else float("nan"),
                "reused_tokens": self.reused_tokens, "looked_up_tokens": self.looked_up_tokens,
                "stored_tokens": self.stored_tokens, "evicted_tokens": self.evicted_tokens,
                "expired_tokens": self.expired_tokens, "rejected": self.rejected,
                "invalidations": self.invalidations, "used_bytes": self.used_bytes,
                "max_bytes": self.max_bytes, "cached_tokens": self.cached_tokens, "nodes": self.num_nodes}

    def clear(self) -> None:
        """Drop every entry (counters are kept)."""
        self._clear()

    def _check_fingerprint(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            if self.lru:
                self.invalidations += 1
            self._clear()
            self.fingerprint = fingerprint

    def _expired(self, node: Node, now: float) -> bool:
        return now - node.last_used_s >= self.ttl_s

    def _remove_leaf(self, node: Node) -> None:
        del node.parent.children[node.tokens[0]]
        del self.lru[id(node)]
        self.used_bytes -= node.kv_bytes
        node.kv = None

    def _expire(self, now: float) -> None:
        while self.lru:
            node = next(iter(self.lru.values()))
            if not self._expired(node, now):
                return
            self.expired_tokens += len(node.tokens)
            self._remove_leaf(node)  # the front is a leaf (see the LRU invariant)

    def _touch(self, node: Node, now: float) -> None:
        """Mark `node` and its ancestors used now, leaf first, so ancestors stay behind descendants."""
        while node is not self.root:
            node.last_used_s = now
            self.lru.move_to_end(id(node))
            node = node.parent

    def _touch_used(self, path: list[tuple[Node, int]], now: float) -> None:
        """Touch the deepest node used whole: a node matched only in part keeps its age (its tail was unused)."""
        whole = [node for node, used in path if used == len(node.tokens)]
        if whole:
            self._touch(whole[-1], now)

    def _match(self, tokens: Sequence[int]) -> tuple[list[tuple[Node, int]], int]:
        """Walk down the tree: [(node, tokens used from it)], total matched."""
        path, node, matched = [], self.root, 0
        while matched < len(tokens):
            child = node.children.get(tokens[matched])
            if child is None:
                break
            run = child.tokens
            common = 1
            limit = min(len(run), len(tokens) - matched)
            while common < limit and run[common] == tokens[matched + common]:
                common += 1
            path.append((child, common))
            matched += common
            if common < len(run):
                break
            node = child
        return path, matched

    # ---- the two operations --------------------------------------------------------------------------------
    def lookup(self, tokens: Sequence[int], fingerprint: str) -> PrefixHit | None:
        """The longest cached prefix of `tokens` (None on a miss). Counts a hit or a miss."""
        self._check_fingerprint(fingerprint)
        now = self.clock()
        self._expire(now)
        path, matched = self._match(tokens)
        self.looked_up_tokens += len(tokens)
        if matched == 0:
            self.misses += 1
            return None
        self.hits += 1
        self.reused_tokens += matched
        self._touch_used(path, now)
        kv = torch.cat([node.kv[:, :, :, :used] for node, used in path], dim=3)  # [2, L, Hkv, matched, D]
        keys, values = list(kv[0].unsqueeze(1).unbind(0)), list(kv[1].unsqueeze(1).unbind(0))
        return PrefixHit(matched, keys, values)

    def insert(self, tokens: Sequence[int], keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
               fingerprint: str) -> int:
        """Store the KV of `tokens` (per layer [1, Hkv, >= len(tokens), D]); copies only the part not cached.

        Returns the number of tokens newly stored (0 if all were cached or the new part does not fit)."""
        self._check_fingerprint(fingerprint)
        tokens = tuple(int(t) for t in tokens)
        if keys[0].shape[0] != 1 or keys[0].shape[2] < len(tokens):
            raise InvalidParameterError("insert expects per-layer KV shaped [1, Hkv, >= len(tokens), D]")
        now = self.clock()
        self._expire(now)
        path, matched = self._match(tokens)
        self._touch_used(path, now)
        new = len(tokens) - matched
        if new == 0:
            return 0
        k0 = keys[0]
        new_bytes = 2 * len(keys) * k0.shape[1] * new * k0.shape[3] * k0.element_size()
        # Evict least recently used leaves until the new run fits; never the path it extends. A run that
        # cannot fit even then is refused before anything is evicted.
        protected = {id(node) for node, _ in path}  # closed under ancestors: the first other node is a leaf
        if new_bytes > self.max_bytes - sum(node.kv_bytes for node, _ in path):
            self.rejected += 1
            return 0
        while self.used_bytes + new_bytes > self.max_bytes:
            victim = next(n for n in self.lru.values() if id(n) not in protected)
            self.evicted_tokens += len(victim.tokens)
            self._remove_leaf(victim)
        parent = self.root
        if path:
            node, used = path[-1]
            parent = self._split(node, used) if used < len(node.tokens) else node
        kv = torch.stack([t[0, :, matched:len(tokens)] for t in list(keys) + list(values)])  # a copy, not a view
        kv = kv.view(2, len(keys), *kv.shape[1:])
        leaf = Node(tokens[matched:], kv, parent)
        parent.children[leaf.tokens[0]] = leaf
        self.lru[id(leaf)] = leaf
        self.used_bytes += leaf.kv_bytes
        self.stored_tokens += new
        self._touch(leaf, now)
        assert self.used_bytes <= self.max_bytes
        return new

    def _split(self, node: Node, at: int) -> Node:
        """Cut `node`'s run after `at` tokens: a new parent holds the head, `node` keeps the tail (same bytes)."""
        head = Node(node.tokens[:at], node.kv[:, :, :, :at].clone(), node.parent, last_used_s=node.last_used_s)
        node.parent.children[head.tokens[0]] = head
        node.tokens, node.kv, node.parent = node.tokens[at:], node.kv[:, :, :, at:].clone(), head
        head.children[node.tokens[0]] = node
        self.lru[id(head)] = head  # at the end, behind its descendant `node`: the LRU invariant holds
        return head

    # ---- the decoder's side ------------------------------------------------------------------------------
    def load_into(self, kv_cache, tokens: Sequence[int], fingerprint: str) -> int:
        """Load the longest cached prefix of `tokens` into an empty KV cache; returns its length (0 on a miss)."""
        hit = self.lookup(tokens, fingerprint)
        if hit is None:
            return 0
        kv_cache.load(hit.keys, hit.values)
        return hit.length

    def store_from(self, kv_cache, tokens: Sequence[int], fingerprint: str) -> int:
        """Store the KV a cache holds for `tokens` (its first len(tokens) positions)."""
        n = len(tokens)
        if kv_cache.length < n:
            raise InvalidParameterError(f"the KV cache holds {kv_cache.length} tokens, fewer than {n}")
        keys = [k[:, :, :n] for k in kv_cache.keys]
        values = [v[:, :, :n] for v in kv_cache.values]
        return self.insert(tokens, keys, values, fingerprint)
