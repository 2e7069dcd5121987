"""The ring's communicators: NCCL point-to-point (:class:`RingComm`) and the GPUs' copy engines.

:class:`RingComm` posts each exchange as one ``batch_isend_irecv`` in the group and counts
the bytes. Its subclass :class:`CopyEngineComm` takes no thread blocks from the kernels.

NCCL moves point-to-point data with thread blocks on the SMs, beside the attention
kernels, so ring traffic slows the kernels it is meant to hide behind; a DMA copy of the
peer's memory by the copy engines takes no SMs (``docs/benchmarks/overlap-2xh200.json`` has
the measurements). :class:`CopyEngineComm` does the ring's exchanges that way, between GPUs of
one host:

- each kind of send (*channel*: ``"send"`` for K/V, ``"grad"`` for dK/dV) owns two
  *slots* in PyTorch symmetric memory (mapped into every peer's address space) and a
  copy stream; a send is written straight into the slot of its exchange (the channel's
  exchange ``n`` uses slot ``n % 2``, the same ``n`` on every rank);
- the sender signals "ready" on its stream after the writes; the receiver, on the
  channel's stream, waits for it, copies the sender's slot into its own buffer
  (``copy_``: a DMA copy over NVLink) and signals "consumed"; the sender waits for that
  before it writes the slot again, two exchanges of the channel later;
- the receiving stream waits for the copy only where the data is used.

Separate channels matter from 3 ring steps on: with two slots shared by K/V and dK/dV,
each step's dK/dV would wait, on the compute stream, for the previous step's dK/dV to be
copied out.

Slots hold the largest payload any rank may send (a bound from the shapes, the same on
every rank), so growing them is a collective step that every rank takes at the same call.

It is opt-in (``transport="copy_engine"``; the default is ``"nccl"``): its gain is small
and depends on the workload (``docs/benchmarks/ring-4xh200-copy-engine.json``), and its
slots keep symmetric memory between calls (:func:`release_copy_engine_slots` frees them).
"""

from __future__ import annotations

import datetime
import importlib.util
import socket
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .sharding import group_rank_and_size

__all__ = [
    "CHANNELS",
    "TRANSPORTS",
    "CollectiveError",
    "CopyEngineComm",
    "Exchange",
    "RingComm",
    "RingCommStats",
    "check_transport",
    "release_copy_engine_slots",
    "ring_comm",
    "timed_wait",
]


class CollectiveError(RuntimeError):
    """A collective or point-to-point transfer did not complete: a peer stalled (timeout) or died."""


def timed_wait(work: Any, timeout: float | None, what: str | Callable[[], str]) -> None:
    """Wait for ``work`` (``None``: forever); raise :class:`CollectiveError` naming ``what`` (a string, or a
    function returning one, called only on failure) when it times out or fails."""
    try:
        if timeout is None:
            work.wait()
        else:
            work.wait(datetime.timedelta(seconds=timeout))
    except RuntimeError as exc:
        limit = "" if timeout is None else f" within timeout={timeout:g} s"
        described = what() if callable(what) else what
        raise CollectiveError(
            f"rank {dist.get_rank()}: {described} did not complete{limit}: a peer stalled or died ({exc}). "
            f"The process group is no longer usable: stop this job and restart from a checkpoint."
        ) from exc


# -- the NCCL communicator -----------------------------------------------------------------------------


@dataclass
class RingCommStats:
    """Bytes this rank sent: in the last forward, the last backward, in total, and per peer (group rank)."""

    forward_bytes: int = 0
    backward_bytes: int = 0
    total_bytes: int = 0
    calls: int = 0
    peer_bytes: dict[int, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.forward_bytes = self.backward_bytes = self.total_bytes = self.calls = 0
        self.peer_bytes = {}


@dataclass
class Exchange:
    """One posted ``batch_isend_irecv``: keeps the buffers alive until :meth:`wait` returns the received one.

    With a ``timeout`` (seconds), a wait that does not complete in time raises :class:`CollectiveError`
    naming ``what()``.
    """

    works: list[Any]
    send: torch.Tensor | None
    recv: torch.Tensor | None
    timeout: float | None = None
    what: Callable[[], str] = lambda: "ring exchange"

    def wait(self) -> torch.Tensor | None:
        for work in self.works:
            timed_wait(work, self.timeout, self.what)
        self.works = []
        return self.recv


@dataclass
class RingComm:
    """The ring's communicator: P2P exchanges of flat buffers in ``group`` (group ranks), bytes counted in ``stats``.

    Hooks for subclasses (a communicator with pooled buffers or copy engines):
    :meth:`begin` starts a phase (``"forward"`` or ``"backward"``), :meth:`reserve` learns the
    largest send of the pass, :meth:`empty` allocates every flat buffer the schedule sends or
    receives, :meth:`exchange` posts one exchange. ``timeout`` (seconds, ``None``: wait forever)
    bounds every wait: a stalled or dead peer raises :class:`CollectiveError` naming ``context``
    (e.g. the module, rank and call), the phase, the exchange and both peers.
    """

    group: Any
    rank: int
    world_size: int
    stats: RingCommStats
    phase: str = "forward"
    peers: dict[int, int] = field(default_factory=dict)
    timeout: float | None = None
    context: str = ""
    exchanges: int = 0  # exchanges posted in this phase

    def describe_exchange(self, index: int, send_to: int, recv_from: int) -> str:
        """What exchange ``index`` (from 1) of this phase is, for error messages."""
        return (
            f"{self.context}ring exchange ({self.phase}, exchange {index}: receive from group rank {recv_from} = "
            f"global rank {self.global_rank(recv_from)}, send to group rank {send_to} = global rank "
            f"{self.global_rank(send_to)})"
        )

    @classmethod
    def for_group(cls, process_group: Any, stats: RingCommStats) -> RingComm:
        """A communicator over ``process_group`` (``None``: the default group, or one process)."""
        rank, world_size = group_rank_and_size(process_group)
        return cls(process_group, rank, world_size, stats)

    def global_rank(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        if group_rank not in self.peers:
            self.peers[group_rank] = dist.get_global_rank(self.group, group_rank)
        return self.peers[group_rank]

    def begin(self, phase: str, *, reset: bool = True) -> None:
        """Start the forward or backward pass of one call: bytes of this phase count from zero.

        ``reset=False`` keeps counting on top of the phase's bytes so far (a schedule whose stats
        add up over calls).
        """
        self.phase = phase
        self.exchanges = 0
        if not reset:
            return
        if phase == "forward":
            self.stats.forward_bytes = 0
        else:
            self.stats.backward_bytes = 0

    def reserve(self, use: str, nbytes: int, device: torch.device) -> None:
        """Called by every rank at the same point before a pass whose ``use`` sends (``"send"``: K/V, ``"grad"``:
        dK/dV) are at most ``nbytes``; no-op here."""

    def count_sent(self, send: torch.Tensor, send_to: int) -> None:
        sent = send.numel() * send.element_size()
        self.stats.total_bytes += sent
        self.stats.peer_bytes[send_to] = self.stats.peer_bytes.get(send_to, 0) + sent
        if self.phase == "forward":
            self.stats.forward_bytes += sent
        else:
            self.stats.backward_bytes += sent

    def empty(self, use: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        """A flat buffer of ``numel`` elements of ``like``'s dtype and device for ``use`` (``"send"``, ``"recv"``,
        ``"grad"``) of the next exchange; its contents are undefined."""
        return torch.empty(numel, dtype=like.dtype, device=like.device)

    def exchange(
        self,
        send: torch.Tensor | None,
        send_to: int,
        recv_numel: int,
        recv_from: int,
        like: torch.Tensor,
        *,
        use: str = "send",
    ) -> Exchange:
        """Post the send of the flat ``send`` buffer (from :meth:`empty` with ``use``) and the receive of
        ``recv_numel`` elements."""
        ops, recv = [], None
        if send is not None and send.numel():
            ops.append(dist.P2POp(dist.isend, send, self.global_rank(send_to), self.group))
            self.count_sent(send, send_to)
        if recv_numel:
            recv = self.empty("recv", recv_numel, like)
            ops.append(dist.P2POp(dist.irecv, recv, self.global_rank(recv_from), self.group))
        works = dist.batch_isend_irecv(ops) if ops else []
        self.exchanges += 1
        index = self.exchanges
        return Exchange(
            list(works), send, recv, self.timeout, lambda: self.describe_exchange(index, send_to, recv_from)
        )


# -- the copy-engine communicator ---------------------------------------------------------------

TRANSPORTS = ("nccl", "copy_engine")
CHANNELS = ("send", "grad")  # K/V and dK/dV: each has its own two slots and copy stream
_READY, _CONSUMED = 0, 2  # a channel's signals: _READY + slot, _CONSUMED + slot (after its base)
_SIGNAL_TIMEOUT_MS = 300_000  # a peer that never signals ends in a CUDA error, not a hang
_ALIGN = 256


def check_transport(transport: str) -> str:
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {list(TRANSPORTS)}, got {transport!r}")
    return transport


@dataclass
class _Channel:
    """One kind of send (``"send"``: K/V, ``"grad"``: dK/dV): its two slots and what is still in flight."""

    signal_base: int  # its signal channels: _READY + slot and _CONSUMED + slot, from here
    capacity: int = 0  # bytes per slot
    buffer: torch.Tensor | None = None
    handle: Any = None
    count: int = 0  # exchanges so far (the same on every rank)
    consumer: list[int | None] = field(default_factory=lambda: [None, None])
    stream: torch.cuda.Stream | None = None  # where this channel's copies wait and run
    remote: dict[int, torch.Tensor] = field(default_factory=dict)  # each peer's buffer, as bytes

    def peer_bytes(self, peer: int) -> torch.Tensor:
        if peer not in self.remote:
            assert self.buffer is not None, "a channel reads peers' slots only once it has its own"
            self.remote[peer] = self.handle.get_buffer(peer, (self.buffer.numel(),), torch.uint8, 0)
        return self.remote[peer]

    def signal(self, kind: int, slot: int) -> int:
        return self.signal_base + kind + slot

    def wait_consumed(self, slot: int) -> None:
        """Make the current stream wait until the slot's last payload has been copied out by its receiver."""
        consumer = self.consumer[slot]
        if consumer is not None:
            self.handle.wait_signal(consumer, self.signal(_CONSUMED, slot), _SIGNAL_TIMEOUT_MS)
            self.consumer[slot] = None

    def release(self, group: Any, device: torch.device) -> None:
        """Free the slots once peers have copied out what they may still read (collective: every rank at once)."""
        for slot in range(len(self.consumer)):
            self.wait_consumed(slot)
        torch.cuda.synchronize(device)
        dist.barrier(group=group, device_ids=[device.index])
        self.buffer = self.handle = None
        self.remote = {}
        self.capacity = 0


@dataclass
class _Slots:
    """Per (group, device): whether the copy engines are usable and each channel's slots."""

    group: Any = None  # the process group the slots belong to
    usable: bool | None = None  # decided collectively (every rank agrees) on first use
    channels: dict[str, _Channel] = field(
        default_factory=lambda: {use: _Channel(4 * index) for index, use in enumerate(CHANNELS)}
    )


_SLOTS: dict[tuple[str, int], _Slots] = {}


class _StreamWait:
    """A posted copy: ``wait()`` makes the current stream wait for it."""

    def __init__(self, event: torch.cuda.Event) -> None:
        self.event = event

    def wait(self) -> None:
        torch.cuda.current_stream().wait_event(self.event)


@dataclass
class CopyEngineComm(RingComm):
    """A :class:`~ring_core.ring.RingComm` whose exchanges are DMA copies from the peer's symmetric memory."""

    slots: _Slots = field(default_factory=_Slots)

    def reserve(self, use: str, nbytes: int, device: torch.device) -> None:
        slots = self.slots
        if slots.usable is None:
            slots.usable = _usable(self.group, device)
        if not slots.usable:
            raise RuntimeError(
                "transport='copy_engine' needs CUDA tensors in an NCCL group whose ranks share one host, with "
                "torch.distributed._symmetric_memory; use transport='nccl'"
            )
        if nbytes > slots.channels[use].capacity:
            self._grow(slots.channels[use], -(-nbytes // _ALIGN) * _ALIGN, device)

    def _grow(self, channel: _Channel, capacity: int, device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        channel.release(self.group, device)
        channel.buffer = symm_mem.empty(2 * capacity, dtype=torch.uint8, device=device)
        channel.handle = symm_mem.rendezvous(channel.buffer, _group_or_world(self.group))
        channel.capacity = capacity
        channel.stream = channel.stream or torch.cuda.Stream(device)

    def empty(self, use: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        channel = self.slots.channels.get(use)
        if channel is None or channel.buffer is None:  # "recv", or a channel never reserved
            return super().empty(use, numel, like)
        slot = channel.count % 2
        nbytes = numel * like.element_size()
        if nbytes > channel.capacity:
            raise RuntimeError(f"CopyEngineComm: a {nbytes}-byte {use} exceeds the reserved {channel.capacity} bytes")
        channel.wait_consumed(slot)
        start = slot * channel.capacity
        return channel.buffer[start : start + nbytes].view(like.dtype)

    def exchange(
        self,
        send: torch.Tensor | None,
        send_to: int,
        recv_numel: int,
        recv_from: int,
        like: torch.Tensor,
        *,
        use: str = "send",
    ) -> Exchange:
        channel = self.slots.channels[use]
        if channel.buffer is None:
            return super().exchange(send, send_to, recv_numel, recv_from, like, use=use)
        slot = channel.count % 2
        channel.count += 1
        if send is not None and send.numel():
            self.count_sent(send, send_to)
            # after the writes, in stream order
            channel.handle.put_signal(send_to, channel.signal(_READY, slot), _SIGNAL_TIMEOUT_MS)
            channel.consumer[slot] = send_to
        if not recv_numel:
            return Exchange([], send, None)
        recv = self.empty("recv", recv_numel, like)
        start = slot * channel.capacity
        remote = channel.peer_bytes(recv_from)[start : start + recv.numel() * recv.element_size()]
        assert channel.stream is not None, "a channel with slots has its stream (see _grow)"
        channel.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(channel.stream):
            channel.handle.wait_signal(recv_from, channel.signal(_READY, slot), _SIGNAL_TIMEOUT_MS)
            recv.copy_(remote.view(like.dtype))
            channel.handle.put_signal(recv_from, channel.signal(_CONSUMED, slot), _SIGNAL_TIMEOUT_MS)
            done = torch.cuda.Event()
            done.record()
        return Exchange([_StreamWait(done)], send, recv)


def _usable(group: Any, device: torch.device) -> bool:
    """Whether every rank can use the copy engines: CUDA, NCCL, symmetric memory, one host (agreed by all)."""
    nccl = dist.get_backend(group) == "nccl"
    ok = nccl and importlib.util.find_spec("torch.distributed._symmetric_memory") is not None
    where = device if nccl else torch.device("cpu")
    mine = torch.tensor([int(ok), zlib.crc32(socket.gethostname().encode())], dtype=torch.int64, device=where)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group)
    rows = [t.tolist() for t in table]
    return all(row[0] for row in rows) and len({row[1] for row in rows}) == 1


def _group_or_world(process_group: Any) -> dist.ProcessGroup:
    """``process_group``, or the default group for None (torch.distributed is initialised wherever this is called)."""
    group = process_group or dist.group.WORLD
    assert group is not None, "torch.distributed is not initialised"
    return group


def release_copy_engine_slots(process_group: Any = None) -> int:
    """Free the copy-engine transport's slots of ``process_group`` (``None``: the default group) on this rank and
    return the bytes freed; the next ring call with ``transport="copy_engine"`` allocates them again.

    Collective: call it on every rank of the group at the same point, between ring calls.
    """
    if not _SLOTS:  # nothing allocated (no group needed to say so)
        return 0
    group = _group_or_world(process_group)
    freed = 0
    for (name, index), slots in _SLOTS.items():
        if name == group.group_name and slots.group is group:
            for channel in slots.channels.values():
                if channel.buffer is not None:
                    freed += channel.buffer.numel()
                    channel.release(group, torch.device("cuda", index))
    return freed


def ring_comm(
    process_group: Any,
    stats: RingCommStats,
    transport: str,
    device: torch.device,
    *,
    timeout: float | None = None,
    context: str = "",
) -> RingComm:
    """The ring's communicator for ``transport`` (``"nccl"``, or ``"copy_engine"`` for CUDA tensors).

    ``timeout`` and ``context``: see :class:`RingComm` (the copy engines' own waits are bounded by
    their signal timeout and end in a CUDA error).
    """
    rank, world_size = group_rank_and_size(process_group)
    if transport == "nccl" or world_size == 1:
        return RingComm(process_group, rank, world_size, stats, timeout=timeout, context=context)
    if device.type != "cuda":
        raise ValueError(f"transport='copy_engine' needs CUDA tensors, got device {device}")
    group = _group_or_world(process_group)
    key = (group.group_name, device.index if device.index is not None else torch.cuda.current_device())
    slots = _SLOTS.get(key)
    if slots is None or slots.group is not group:  # first use, or the group was destroyed and made anew
        slots = _SLOTS[key] = _Slots(group=group)
    return CopyEngineComm(process_group, rank, world_size, stats, timeout=timeout, context=context, slots=slots)
