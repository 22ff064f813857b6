"""SimPy model of one machine: GPUs, host CPU, NVMe, and the links between them.

Each device is a class that owns its SimPy resources; every constant comes from
a ``HardwareSpec`` (``wicore.hal``), never from module globals.

Bandwidth is shared by a ``FlowNetwork``: a transfer is a flow over a path of
one-direction ``Link`` objects and gets its max-min fair share (progressive
filling), recomputed only when a flow starts or finishes.

Topology built by ``Machine`` (all links one direction; PCIe and the GPU
fabric are full duplex, so each direction is its own link):

* ``pcie{i}`` host->GPU i, ``pcie{i}.d2h`` GPU i->host (``spec.pcie``).
* ``upstream`` / ``upstream.d2h`` when ``spec.shared_upstream_gbps > 0``: every
  host<->GPU flow (NVMe ones included) also crosses it, modelling GPUs behind
  one PCIe switch or NUMA uplink.
* GPU<->GPU: with ``interconnect.kind == "pcie"`` a P2P copy crosses
  ``pcie{src}.d2h`` and ``pcie{dst}`` (it shares lanes with host copies) with a
  per-flow cap of ``interconnect.bandwidth_gbps``; switched fabrics (NVLink
  via NVSwitch) get ``{kind}{i}.tx`` / ``{kind}{i}.rx`` per GPU; mesh fabrics
  (Infinity Fabric, HCCS) get one link per ordered pair ``{kind}{s}>{d}``.
* ``dram`` (host memory, ``dram_bandwidth_gbps * bandwidth_efficiency``),
  ``nvme.read`` and ``nvme.write``.

Pageable host copies use the same PCIe link as pinned ones with a per-flow
rate cap of ``pcie.pageable_bandwidth_gbps`` (the driver's bounce-buffer
memcpy is the bottleneck, not the lanes), so a pageable copy leaves the rest
of the link to concurrent flows.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import simpy

from wicore.hal import GB, CPUSpec, GPUSpec, HardwareSpec, NVMeSpec

US = 1e-6
MESH_KINDS = frozenset({"infinity_fabric", "xgmi", "hccs"})  # direct link per GPU pair
_REL_EPS = 1e-12  # relative slack when comparing fair-share levels
_TIME_EPS = 1e-13  # flows this close (seconds, scaled by now) to done finish together


@dataclass(frozen=True, slots=True)
class TransferRecord:
    name: str
    path: tuple[str, ...]
    nbytes: int
    start: float  # when the transfer was requested (before latency)
    end: float  # when the last byte arrived
    first_byte: float = math.nan  # when bytes started to flow (start + latency, after any NVMe queueing)

    @property
    def duration(self) -> float:
        return self.end - self.start


class Link:
    """One direction of a channel with capacity ``bytes_per_s`` and fixed ``latency_s``.

    Counters: ``bytes_moved`` (of finished flows), ``busy_time`` (time with at
    least one flow moving bytes; latency is not busy), ``records`` of
    ``(start, end, nbytes, name)`` per finished flow (start = first byte), kept
    when ``record`` is true and bounded by ``max_records`` (None: unbounded).
    """

    def __init__(self, name: str, bytes_per_s: float, latency_s: float, record: bool = True,
                 max_records: int | None = None) -> None:
        if not bytes_per_s > 0:
            raise ValueError(f"link {name}: bytes_per_s must be > 0, got {bytes_per_s}")
        if latency_s < 0:
            raise ValueError(f"link {name}: latency_s must be >= 0, got {latency_s}")
        self.name = name
        self.bytes_per_s = float(bytes_per_s)
        self.latency_s = float(latency_s)
        self.record = record
        self.records: deque[tuple[float, float, int, str]] = deque(maxlen=max_records)
        self.bytes_moved = 0
        self.busy_time = 0.0
        self.active = 0  # flows currently moving bytes over this link
        self._busy_since = 0.0
        self.reserved_until = -1.0  # an uncontended transfer booked without events (Machine.reserve_h2d)
        self._epoch = 0  # FlowNetwork scratch (a link belongs to one network)
        self._cap = 0.0
        self._n = 0
        self._tight = False

    def busy_time_at(self, now: float) -> float:
        """``busy_time`` including the interval still open at ``now``."""
        return self.busy_time + (now - self._busy_since if self.active else 0.0)

    def __repr__(self) -> str:
        return f"Link({self.name!r}, {self.bytes_per_s / GB:g} GB/s, {self.latency_s / US:g} us)"


@dataclass(slots=True, eq=False)
class _Flow:
    path: tuple[Link, ...]
    nbytes: int
    cap: float  # per-flow rate cap, bytes/s (inf: none)
    event: simpy.Event
    name: str
    requested: float  # transfer() call time
    remaining: float  # bytes still to move
    rate: float = 0.0
    started: float = 0.0  # first byte (after latency)


class FlowNetwork:
    """Bandwidth sharing between concurrent transfers: max-min fair (progressive
    filling) over the links each flow crosses, with optional per-flow rate caps.

    Rates are recomputed only when a flow starts or finishes; a single pending
    completion timeout is kept valid by a version counter (stale ones are
    ignored when they fire).
    """

    def __init__(self, env: simpy.Environment) -> None:
        self.env = env
        self._flows: list[_Flow] = []
        self._last = float(env.now)
        self._version = 0
        self._target: _Flow | None = None
        self._epoch = 0
        self.completed = 0

    def transfer(self, path: Sequence[Link], nbytes: int, name: str = "", latency_s: float | None = None,
                 rate_cap: float | None = None) -> simpy.Event:
        """Move ``nbytes`` over ``path``; the event's value is a ``TransferRecord``.

        ``latency_s`` (default: the largest latency on the path) passes before
        bytes flow; ``rate_cap`` (bytes/s) bounds this flow's rate.
        """
        links = tuple(dict.fromkeys(path))  # a link listed twice is crossed once
        if not links:
            raise ValueError("transfer: path must contain at least one link")
        if nbytes < 0:
            raise ValueError(f"transfer {name!r}: nbytes must be >= 0, got {nbytes}")
        cap = math.inf if rate_cap is None else float(rate_cap)
        if not cap > 0:
            raise ValueError(f"transfer {name!r}: rate_cap must be > 0, got {rate_cap}")
        latency = max(link.latency_s for link in links) if latency_s is None else latency_s
        if latency < 0:
            raise ValueError(f"transfer {name!r}: latency_s must be >= 0, got {latency_s}")
        flow = _Flow(links, int(nbytes), cap, self.env.event(), name, float(self.env.now), float(nbytes))
        if latency > 0:
            self.env.timeout(latency).callbacks.append(lambda _ev: self._start(flow))
        else:
            self._start(flow)
        return flow.event

    def rates(self) -> list[tuple[str, float]]:
        """(name, bytes/s) of the flows moving bytes now, in arrival order."""
        return [(f.name, f.rate) for f in self._flows]

    @property
    def active(self) -> int:
        return len(self._flows)

    # -- internals ---------------------------------------------------------
    def _start(self, flow: _Flow) -> None:
        now = float(self.env.now)
        flow.started = now
        if flow.nbytes == 0:
            self._finish(flow, now)
            return
        self._advance(now)
        self._flows.append(flow)
        alone = True
        for link in flow.path:
            if now < link.reserved_until:
                raise RuntimeError(f"link {link.name}: a flow starts at {now} while an uncontended transfer "
                                   f"holds it until {link.reserved_until}; it must not be booked without events")
            if link.active == 0:
                link._busy_since = now
            else:
                alone = False
            link.active += 1
        if alone:  # no shared link: nobody else's rate changes
            flow.rate = min(flow.cap, min(link.bytes_per_s for link in flow.path))
        else:
            self._allocate()
        self._reschedule()

    def _advance(self, now: float) -> None:
        dt = now - self._last
        if dt > 0:
            for f in self._flows:
                f.remaining -= f.rate * dt
        self._last = now

    def _allocate(self) -> None:
        """Progressive filling; per-link scratch state lives on the links (``_cap``, ``_n``, ``_tight``)."""
        if len(self._flows) == 1:
            f = self._flows[0]
            f.rate = min(f.cap, min(link.bytes_per_s for link in f.path))
            return
        self._epoch += 1
        epoch = self._epoch
        links: list[Link] = []
        for f in self._flows:
            for link in f.path:
                if link._epoch != epoch:
                    link._epoch = epoch
                    link._cap = link.bytes_per_s
                    link._n = link.active
                    links.append(link)
        pending = self._flows
        while pending:  # each round freezes >= 1 flow at the current water level
            level = math.inf
            for link in links:
                if link._n and link._cap < level * link._n:
                    level = link._cap / link._n
            for f in pending:
                if f.cap < level:
                    level = f.cap
            slack = level * (1.0 + _REL_EPS)
            for link in links:
                link._tight = link._n > 0 and link._cap <= slack * link._n
            rest: list[_Flow] = []
            for f in pending:
                frozen = f.cap <= slack
                if not frozen:
                    for link in f.path:
                        if link._tight:
                            frozen = True
                            break
                if frozen:
                    f.rate = level
                    for link in f.path:
                        link._cap = max(0.0, link._cap - level)
                        link._n -= 1
                else:
                    rest.append(f)
            pending = rest

    def _reschedule(self) -> None:
        """Set the one pending completion timeout (older ones become stale)."""
        self._version += 1
        if not self._flows:
            self._target = None
            return
        target = self._flows[0]
        best = target.remaining / target.rate
        for f in self._flows:
            t = f.remaining / f.rate
            if t < best:
                best, target = t, f
        self._target = target
        version = self._version
        self.env.timeout(max(0.0, best)).callbacks.append(lambda _ev: self._on_due(version))

    def _on_due(self, version: int) -> None:
        if version != self._version:
            return  # a flow arrived or left since this timeout was set
        now = float(self.env.now)
        self._advance(now)
        tol = _TIME_EPS * max(1.0, abs(now))
        keep: list[_Flow] = []
        done: list[_Flow] = []
        for f in self._flows:
            (done if f is self._target or f.remaining <= f.rate * tol else keep).append(f)
        self._flows = keep
        shared = False
        for f in done:
            for link in f.path:
                link.active -= 1
                if link.active == 0:
                    link.busy_time += now - link._busy_since
                else:
                    shared = True
        if shared:  # a survivor lost a competitor: its share may grow
            self._allocate()
        for f in done:
            self._finish(f, now)
        self._reschedule()

    def _finish(self, f: _Flow, now: float) -> None:
        names = tuple(link.name for link in f.path)
        for link in f.path:
            link.bytes_moved += f.nbytes
            if link.record:
                link.records.append((f.started, now, f.nbytes, f.name))
        self.completed += 1
        f.event.succeed(TransferRecord(f.name, names, f.nbytes, f.requested, now, f.started))


class _Stream:
    """A capacity-1 execution stream with busy-time accounting (shared by GPU and CPU)."""

    def __init__(self, env: simpy.Environment, record: bool, max_records: int | None) -> None:
        self.env = env
        self.stream = simpy.Resource(env, capacity=1)
        self.busy_time = 0.0
        self.record = record
        self.records: deque[tuple[float, float, str]] = deque(maxlen=max_records)

    def compute(self, seconds: float, name: str = "") -> simpy.Process:
        """Request the stream, hold it ``seconds``, release; the value is ``(start, end)``."""
        if seconds < 0:
            raise ValueError(f"compute {name!r}: seconds must be >= 0, got {seconds}")
        return self.env.process(self._run(seconds, name))

    def _run(self, seconds: float, name: str) -> Generator[simpy.Event, Any, tuple[float, float]]:
        with self.stream.request() as req:
            yield req
            start = float(self.env.now)
            yield self.env.timeout(seconds)
            end = float(self.env.now)
        self.busy_time += end - start
        if self.record:
            self.records.append((start, end, name))
        return start, end


class GPU(_Stream):
    """One GPU: a compute stream (``stream``, capacity 1) and its PCIe links.

    Copies run on the ``FlowNetwork`` (copy engines), so they overlap compute.
    """

    def __init__(self, env: simpy.Environment, index: int, spec: GPUSpec, link: Link, link_d2h: Link,
                 record: bool = True, max_records: int | None = None) -> None:
        super().__init__(env, record, max_records)
        self.index = index
        self.spec = spec
        self.link = link  # host -> GPU
        self.link_d2h = link_d2h  # GPU -> host


class CPU(_Stream):
    """The host: one compute stream (the shallow CPU path) and a DRAM link."""

    def __init__(self, env: simpy.Environment, spec: CPUSpec, net: FlowNetwork, record: bool = True,
                 max_records: int | None = None) -> None:
        super().__init__(env, record, max_records)
        self.spec = spec
        self.net = net
        self.dram = Link("dram", spec.dram_bandwidth_gbps * GB * spec.bandwidth_efficiency, 0.0, record,
                         max_records)

    def stream_memory(self, nbytes: int, name: str = "") -> simpy.Event:
        """A memory-bound pass over ``nbytes`` of host DRAM, sharing ``dram`` with other such passes."""
        return self.net.transfer([self.dram], nbytes, name)


class NVMe:
    """An NVMe drive: read and write links and ``slots`` (capacity ``queue_depth``),
    one slot per outstanding IO (one ``read``/``write`` call is one IO)."""

    def __init__(self, env: simpy.Environment, spec: NVMeSpec, net: FlowNetwork, record: bool = True,
                 max_records: int | None = None) -> None:
        self.env = env
        self.spec = spec
        self.net = net
        lat = spec.latency_us * US
        self.read_link = Link("nvme.read", spec.read_gbps * GB, lat, record, max_records)
        self.write_link = Link("nvme.write", spec.write_gbps * GB, lat, record, max_records)
        self.slots = simpy.Resource(env, capacity=max(1, spec.queue_depth))

    def read(self, nbytes: int, name: str = "") -> simpy.Process:
        return self.io([self.read_link], nbytes, name)

    def write(self, nbytes: int, name: str = "") -> simpy.Process:
        return self.io([self.write_link], nbytes, name)

    def io(self, path: Sequence[Link], nbytes: int, name: str = "") -> simpy.Process:
        """One IO over ``path`` (which should include a drive link) holding a queue slot.

        The value is the ``TransferRecord``; its ``start`` is when the slot was granted.
        """
        return self.env.process(self._io(tuple(path), nbytes, name))

    def _io(self, path: tuple[Link, ...], nbytes: int, name: str) -> Generator[simpy.Event, Any, Any]:
        with self.slots.request() as req:
            yield req
            record = yield self.net.transfer(path, nbytes, name)
        return record


class Machine:
    """Builds devices and links from a ``HardwareSpec`` (see the module docstring for the topology)."""

    def __init__(self, env: simpy.Environment, spec: HardwareSpec, record: bool = True,
                 max_records: int | None = None) -> None:
        self.env = env
        self.spec = spec
        self.net = FlowNetwork(env)
        self._links: dict[str, Link] = {}
        self._record = record
        self._max_records = max_records
        up_gbps = spec.shared_upstream_gbps
        self.upstream = self._add("upstream", up_gbps * GB, 0.0) if up_gbps > 0 else None
        self.upstream_d2h = self._add("upstream.d2h", up_gbps * GB, 0.0) if up_gbps > 0 else None
        pcie = spec.pcie
        self.gpus: list[GPU] = []
        for i in range(spec.num_gpus):
            h2d = self._add(f"pcie{i}", pcie.bytes_per_s, pcie.latency_us * US)
            d2h = self._add(f"pcie{i}.d2h", pcie.bytes_per_s, pcie.latency_us * US)
            self.gpus.append(GPU(env, i, spec.gpu, h2d, d2h, record, max_records))
        ic = spec.interconnect
        self._p2p_cap: float | None = ic.bytes_per_s if ic.kind == "pcie" else None
        self._p2p = self._build_p2p()
        self._p2p_latency = ic.latency_us * US
        self.cpu = CPU(env, spec.cpu, self.net, record, max_records)
        self._links["dram"] = self.cpu.dram
        self.nvme = NVMe(env, spec.nvme, self.net, record, max_records)
        self._links["nvme.read"] = self.nvme.read_link
        self._links["nvme.write"] = self.nvme.write_link

    def _build_p2p(self) -> dict[tuple[int, int], tuple[Link, ...]]:
        ic, n = self.spec.interconnect, self.spec.num_gpus
        lat = ic.latency_us * US
        pairs = [(s, d) for s in range(n) for d in range(n) if s != d]
        if ic.kind == "pcie":  # P2P over each GPU's own PCIe lanes
            return {(s, d): (self.gpus[s].link_d2h, self.gpus[d].link) for s, d in pairs}
        if ic.kind in MESH_KINDS:  # one direct link per ordered pair
            return {(s, d): (self._add(f"{ic.kind}{s}>{d}", ic.bytes_per_s, lat),) for s, d in pairs}
        if n < 2:
            return {}
        tx = [self._add(f"{ic.kind}{i}.tx", ic.bytes_per_s, lat) for i in range(n)]  # switched fabric
        rx = [self._add(f"{ic.kind}{i}.rx", ic.bytes_per_s, lat) for i in range(n)]
        return {(s, d): (tx[s], rx[d]) for s, d in pairs}

    def _add(self, name: str, bytes_per_s: float, latency_s: float) -> Link:
        link = Link(name, bytes_per_s, latency_s, self._record, self._max_records)
        self._links[name] = link
        return link

    def _gpu(self, gpu: int) -> GPU:
        if not 0 <= gpu < len(self.gpus):
            raise ValueError(f"gpu index {gpu} out of range for {len(self.gpus)} GPU(s)")
        return self.gpus[gpu]

    def _to_gpu(self, gpu: int) -> list[Link]:
        link = self._gpu(gpu).link
        return [self.upstream, link] if self.upstream else [link]

    def _from_gpu(self, gpu: int) -> list[Link]:
        link = self._gpu(gpu).link_d2h
        return [link, self.upstream_d2h] if self.upstream_d2h else [link]

    def _pageable_cap(self, pinned: bool) -> float | None:
        pcie = self.spec.pcie
        return None if pinned or pcie.pageable_bandwidth_gbps <= 0 else pcie.effective_bytes_per_s(False)

    def reserve_h2d(self, gpu: int, nbytes: int, name: str = "") -> TransferRecord | None:
        """Book a pinned host -> GPU copy without SimPy events when it provably runs alone:
        its path is only ``pcie{gpu}`` (no shared upstream) and nothing is on that link. The
        result is exact (latency + bytes / bandwidth, the link's counters updated); a flow that
        tried to start on the link before the booking ends would raise. None: use ``h2d``."""
        if self.upstream is not None:
            return None
        link = self._gpu(gpu).link
        now = float(self.env.now)
        if link.active or now < link.reserved_until:
            return None
        first = now + link.latency_s
        end = first + nbytes / link.bytes_per_s
        link.reserved_until = end
        link.bytes_moved += nbytes
        link.busy_time += end - first
        if link.record:
            link.records.append((first, end, nbytes, name))
        self.net.completed += 1
        return TransferRecord(name, (link.name,), nbytes, now, end, first)

    def h2d(self, gpu: int, nbytes: int, pinned: bool = True, name: str = "") -> simpy.Event:
        """Host -> GPU over ``pcie{gpu}`` (+ ``upstream``); pageable copies are rate-capped."""
        return self.net.transfer(self._to_gpu(gpu), nbytes, name, rate_cap=self._pageable_cap(pinned))

    def d2h(self, gpu: int, nbytes: int, pinned: bool = True, name: str = "") -> simpy.Event:
        """GPU -> host over ``pcie{gpu}.d2h`` (+ ``upstream.d2h``)."""
        return self.net.transfer(self._from_gpu(gpu), nbytes, name, rate_cap=self._pageable_cap(pinned))

    def p2p(self, src: int, dst: int, nbytes: int, name: str = "") -> simpy.Event:
        """GPU ``src`` -> GPU ``dst`` over the interconnect."""
        self._gpu(src)
        self._gpu(dst)
        if src == dst:
            raise ValueError(f"p2p: src and dst are both GPU {src}")
        return self.net.transfer(self._p2p[src, dst], nbytes, name, latency_s=self._p2p_latency,
                                 rate_cap=self._p2p_cap)

    def nvme_to_gpu(self, gpu: int, nbytes: int, name: str = "") -> simpy.Process:
        """NVMe -> GPU as one flow over ``[nvme.read, upstream?, pcie{gpu}]`` holding one queue slot."""
        return self.nvme.io([self.nvme.read_link, *self._to_gpu(gpu)], nbytes, name)

    def gpu_to_nvme(self, gpu: int, nbytes: int, name: str = "") -> simpy.Process:
        """GPU -> NVMe as one flow over ``[pcie{gpu}.d2h, upstream.d2h?, nvme.write]``."""
        return self.nvme.io([*self._from_gpu(gpu), self.nvme.write_link], nbytes, name)

    def links(self) -> dict[str, Link]:
        return dict(self._links)
