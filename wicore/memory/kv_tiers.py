"""HMT for the KV cache: pages on the GPU cached by a replacement policy, the rest in host memory.

A KV page holds ``page_tokens`` tokens of one sequence, K and V of every layer
(one block per page: per-layer blocks would multiply the bookkeeping by the
layer count without changing which bytes move). The scheduler admits
sequences against GPU + host pages together; the policy decides which pages
stay on the GPU:

* a decode step reads every page of its sequence (dense attention), or with
  ``skip_below`` > 0 only the pages whose attention mass in the previous step
  was at least that much (sparse, H2O / Quest-style approximate attention: the
  skipped mass is counted as the approximation error), plus always the newest;
* a page read but not on the GPU is fetched from host memory (a ``fetch`` op,
  needed layer by layer as the step runs);
* the pages a step writes are produced on the GPU (no transfer);
* a victim is demoted to host memory (an ``evict`` op) unless host memory already
  holds an up-to-date copy (full pages never change once written);
* the attention mass each page received (``StepResult.attention_mass``) is fed
  to the policy (A2CR uses it) and remembered for the skip decision.

Pure policy code: no simpy, no torch, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from wicore.memory.policies.base import ReplacementPolicy
from wicore.types import BatchItem, BlockRef, MemoryOp, StepResult


@dataclass
class KVStats:
    reads: int = 0  # page reads by attention
    gpu_hits: int = 0
    fetched: int = 0  # pages brought from host memory
    demoted: int = 0  # pages copied to host memory on eviction
    skipped: int = 0  # page reads skipped by sparse attention
    skipped_mass: float = 0.0  # attention mass those pages had in their previous step
    decode_queries: int = 0
    rows: dict[str, list[Any]] = field(default_factory=lambda: {"time": [], "seq": [], "page": [], "tier": []})


class TieredKV:
    def __init__(self, policy: ReplacementPolicy, page_tokens: int,
                 page_bytes_per_gpu: list[int], gpus: list[int], num_layers: int,
                 skip_below: float = 0.0, record_rows: int = 200_000) -> None:
        self.policy = policy
        self.page_tokens = page_tokens
        self.page_bytes_per_gpu = page_bytes_per_gpu
        self.gpus = gpus
        self.skip_below = skip_below
        self.record_rows = record_rows
        self.stats = KVStats()
        self.on_host: set[tuple[int, int]] = set()  # pages with an up-to-date copy in host memory
        self.pages: dict[int, int] = {}  # seq -> pages it holds
        self.last_mass: dict[tuple[int, int], float] = {}
        self._layers = tuple(BlockRef("kv", layer) for layer in range(num_layers))

    def _record(self, now: float, key: tuple[int, int], tier: str) -> None:
        rows = self.stats.rows
        if len(rows["time"]) < self.record_rows:
            rows["time"].append(now)
            rows["seq"].append(key[0])
            rows["page"].append(key[1])
            rows["tier"].append(tier)

    def _evicted(self, victims: list[Any], now: float) -> int:
        demoted = 0
        for v in victims:
            if v not in self.on_host:
                self.on_host.add(v)
                demoted += 1
            self._record(now, v, "cpu")
        return demoted

    def step_ops(self, items: list[BatchItem], now: float) -> list[MemoryOp]:
        policy, pt, st = self.policy, self.page_tokens, self.stats
        fetched = demoted = 0
        for it in items:
            seq, ctx = it.request_id, it.context_len
            n_old = -(-ctx // pt)
            n_new = -(-(ctx + it.num_tokens) // pt)
            self.pages[seq] = max(self.pages.get(seq, 0), n_new)
            first_written = ctx // pt
            if it.num_tokens == 1:
                st.decode_queries += 1
            for p in range(min(n_old, first_written)):  # pages only read (the last one is written too)
                key = (seq, p)
                if self.skip_below > 0:
                    m = self.last_mass.get(key)
                    if m is not None and m < self.skip_below:
                        st.skipped += 1
                        st.skipped_mass += m
                        continue
                st.reads += 1
                out = policy.access(key, now, 1)
                if out.hit:
                    st.gpu_hits += 1
                else:
                    fetched += 1
                    if out.admitted:
                        self._record(now, key, "gpu")
                demoted += self._evicted(out.evicted, now)
            for p in range(first_written, n_new):  # written on the GPU by this step
                key = (seq, p)
                self.on_host.discard(key)
                out = policy.access(key, now, 1)
                if not out.hit and out.admitted:
                    self._record(now, key, "gpu")
                elif not out.hit:  # bypassed: the new K/V go straight to host memory
                    demoted += 1
                    self.on_host.add(key)
                demoted += self._evicted(out.evicted, now)
        st.fetched += fetched
        st.demoted += demoted
        ops: list[MemoryOp] = []
        for g, pb in zip(self.gpus, self.page_bytes_per_gpu):
            if fetched:  # every layer reads its slice of the fetched pages, in layer order
                ops.append(MemoryOp("fetch", "cpu", f"gpu{g}", fetched * pb, layer=0, device=g,
                                    blocks=self._layers))
            if demoted:
                ops.append(MemoryOp("evict", f"gpu{g}", "cpu", demoted * pb, device=g))
        return ops

    def feedback(self, result: StepResult, now: float) -> None:
        policy, last = self.policy, self.last_mass
        for seq, row in result.attention_mass.items():
            for page, mass in enumerate(row):
                key = (seq, page)
                last[key] = mass
                if key in policy:
                    policy.feedback(key, mass, now)

    def release(self, seq: int) -> None:
        for p in range(self.pages.pop(seq, 0)):
            key = (seq, p)
            self.policy.remove(key)
            self.on_host.discard(key)
            self.last_mass.pop(key, None)

    @property
    def resident_pages(self) -> int:
        return len(self.policy)
