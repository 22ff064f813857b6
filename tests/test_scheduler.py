"""Scheduler: queue orders, batching policies, KV admission, preemption, deadlines, load balancing."""

from __future__ import annotations

import pytest

from wicore.errors import ConfigError
from wicore.memory.page_pool import PagePool
from wicore.scheduler.batching import ChunkedPrefill, ContinuousBatching, StaticBatching
from wicore.scheduler.load_balance import LeastOutstandingTokens, RoundRobin
from wicore.scheduler.queues import FCFS, Priority, ShortestPromptFirst
from wicore.scheduler.scheduler import Scheduler
from wicore.scheduler.sequence import Sequence
from wicore.types import Phase, Request, RequestStatus


def make(batching=None, pages=100, page=16, max_seqs=8, budget=512, queue=None, preemption="recompute",
         swap_pages=0):
    swap = PagePool(swap_pages, page, 1, "swap") if swap_pages else None
    return Scheduler(batching or ContinuousBatching(), queue or FCFS(), PagePool(pages, page, 1), max_seqs,
                     budget, max_context=100_000, preemption=preemption, swap_pool=swap)


def seq(i, prompt=32, out=4, t=0.0, prio=0, deadline=None):
    return Sequence(Request(i, t, prompt, out, prio, deadline))


def apply(s: Scheduler, items):
    """What the engine does after a step (token bookkeeping)."""
    done = []
    by_id = {q.request_id: q for q in s.running}
    for it in items:
        q = by_id[it.request_id]
        q.kv_len += it.num_tokens
        if it.phase is Phase.PREFILL:
            q.prefilled += it.num_tokens
        if it.emits_token:
            q.generated += 1
            if q.generated >= q.req.max_output_tokens:
                done.append(q)
    for q in done:
        s.finish(q)
    return done


def drain(s: Scheduler, limit=1000):
    steps = []
    for _ in range(limit):
        out = s.schedule(0.0)
        if not out.items:
            break
        steps.append(out.items)
        apply(s, out.items)
        assert s.pool.used_pages <= s.pool.num_pages
    return steps


def test_queue_orders():
    a, b, c = seq(0, prompt=50, t=0.0, prio=0), seq(1, prompt=10, t=1.0, prio=5), seq(2, prompt=30, t=2.0, prio=1)
    for policy, order in ((FCFS(), [0, 1, 2]), (Priority(), [1, 2, 0]), (ShortestPromptFirst(), [1, 2, 0])):
        s = make(queue=policy, max_seqs=1)
        for q in (a, b, c):
            q.status = RequestStatus.WAITING
            s.add(Sequence(q.req))
        got = []
        while len(s.queue):
            got.append(s.queue.pop().request_id)
        assert got == order, policy.name


def test_continuous_prefills_new_requests_then_decodes_all():
    s = make()
    for i in range(3):
        s.add(seq(i, prompt=32, out=3))
    first = s.schedule(0.0).items
    assert [it.phase for it in first] == [Phase.PREFILL] * 3 and all(it.emits_token for it in first)
    apply(s, first)
    second = s.schedule(0.0).items
    assert [it.phase for it in second] == [Phase.DECODE] * 3
    assert [it.context_len for it in second] == [32, 32, 32]
    steps = drain(s)
    assert s.pool.used_pages == 0 and not s.running and len(steps) == 2


def test_static_batching_admits_nobody_until_the_batch_is_done():
    s = make(StaticBatching())
    s.add(seq(0, out=2))
    s.add(seq(1, out=5))
    apply(s, s.schedule(0.0).items)
    s.add(seq(2, out=2))  # arrives while the batch runs
    seen = []
    for _ in range(10):
        items = s.schedule(0.0).items
        if not items:
            break
        seen.append({it.request_id for it in items})
        apply(s, items)
    first_with_2 = next(i for i, ids in enumerate(seen) if 2 in ids)
    assert all(1 not in ids for ids in seen[first_with_2:])  # 2 only after 1 finished
    assert all(2 not in ids for ids in seen[:first_with_2])


def test_chunked_prefill_respects_the_token_budget_and_keeps_decoding():
    s = make(ChunkedPrefill(), budget=40)
    s.add(seq(0, prompt=8, out=10))
    apply(s, s.schedule(0.0).items)
    s.add(seq(1, prompt=100, out=2))
    chunks = []
    for _ in range(5):
        items = s.schedule(0.0).items
        assert sum(it.num_tokens for it in items) <= 40
        assert any(it.request_id == 0 and it.phase is Phase.DECODE for it in items)  # decodes never stall
        chunks += [it.num_tokens for it in items if it.request_id == 1 and it.phase is Phase.PREFILL]
        apply(s, items)
    assert chunks == [39, 39, 22]


def test_admission_by_kv_memory_and_recompute_preemption():
    # 4 pages of 16 tokens: two 24-token prompts fit (2 pages each) but cannot both grow past 32
    s = make(pages=4, page=16)
    s.add(seq(0, prompt=24, out=20))
    s.add(seq(1, prompt=24, out=20))
    s.add(seq(2, prompt=24, out=20))
    out = s.schedule(0.0)
    assert [it.request_id for it in out.items] == [0, 1]  # 2 does not fit
    apply(s, out.items)
    preempted = []
    for _ in range(200):
        out = s.schedule(0.0)
        preempted += [q.request_id for q in out.preempted]
        if not out.items:
            break
        apply(s, out.items)
    assert 1 in preempted  # the most recently admitted is preempted first
    assert s.pool.used_pages == 0 and not s.has_work


def test_swap_preemption_moves_pages_to_host_and_back():
    s = make(pages=4, page=16, preemption="swap", swap_pages=8)
    s.add(seq(0, prompt=24, out=20))
    s.add(seq(1, prompt=24, out=20))
    apply(s, s.schedule(0.0).items)
    swapped_out = swapped_in = 0
    for _ in range(200):
        out = s.schedule(0.0)
        swapped_out += out.swap_out_pages
        swapped_in += out.swap_in_pages
        if not out.items:
            break
        apply(s, out.items)
    assert swapped_out > 0 and swapped_in == swapped_out
    assert s.pool.used_pages == 0 and s.swap_pool is not None and s.swap_pool.used_pages == 0


def test_deadline_aborts_with_reason_and_frees_memory():
    s = make()
    late = seq(0, prompt=32, out=100, deadline=1.0)
    s.add(late)
    apply(s, s.schedule(0.0).items)
    assert s.pool.used_pages > 0
    out = s.schedule(1.5)
    assert late in out.aborted and late.abort_reason == "deadline"
    assert s.pool.used_pages == 0


def test_requests_that_can_never_fit_are_rejected_with_a_reason():
    s = make(pages=2, page=16)
    too_big = seq(0, prompt=40, out=10)
    assert s.add(too_big) == "exceeds_kv_capacity" and too_big.status is RequestStatus.ABORTED
    s2 = Scheduler(ContinuousBatching(), FCFS(), PagePool(100, 16, 1), 4, 64, max_context=50)
    assert s2.add(seq(1, prompt=40, out=20)) == "exceeds_context"


def test_max_concurrency():
    s = make(max_seqs=2)
    for i in range(5):
        s.add(seq(i))
    items = s.schedule(0.0).items
    assert len(items) == 2 and len(s.running) == 2


def test_bad_scheduler_settings():
    with pytest.raises(ConfigError, match="max_num_seqs"):
        make(max_seqs=0)
    with pytest.raises(ConfigError, match="preemption"):
        make(preemption="magic")


def test_load_balancers():
    rr = RoundRobin()
    req = Request(0, 0.0, 1, 1)
    assert [rr.choose(req, [0, 0, 0]) for _ in range(4)] == [0, 1, 2, 0]
    assert LeastOutstandingTokens().choose(req, [30, 10, 20]) == 1
    assert LeastOutstandingTokens().choose(req, [5, 5]) == 0
