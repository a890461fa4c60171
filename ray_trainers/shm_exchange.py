"""One float32 vector per rank and step, exchanged through shared memory between ranks on one host.

Why not gloo for this: on these machines (2-core VMs) a gloo collective costs ~1 ms of CPU in
its TCP loop thread per call even for one float (syscalls + three thread hand-offs), and the
2 workers already use both cores, so every step paid ~2 ms of sync overhead before moving a
byte, ~4 ms with the E-step's 1.8 MB of gradients. Ranks that share a host can instead write
their vector into a shared segment and read everyone's: no syscall, no thread, no copy
through the kernel (`dr bench estep` measures both transports).

Protocol (`ShmExchange`): one segment, one step counter per rank (each on its own cache line)
then two sets of slots [2 parities, world, n] float32. At step t a rank writes its slot of
parity t % 2, then sets its counter to t and waits until every counter is >= t; every rank
then reads the same [world, n] and reduces it in the same order, so all get bitwise-equal
results. Double buffering makes a second barrier unnecessary: a rank writes parity t % 2 again
at step t + 2 only after every rank published t + 1, i.e. finished reading step t.
Correctness relies on x86-64's store and load ordering (TSO: the slot's stores are visible
before the counter's, a reader sees the counter before it loads the slot; glibc's non-temporal
memcpy ends with an sfence), so `open_exchange` only offers it on x86-64; elsewhere, or when
the ranks do not share /dev/shm, callers fall back to gloo.
"""
from __future__ import annotations

import mmap
import os
import platform
import time
import uuid

import numpy as np
import torch

SHM_DIR = "/dev/shm"
_LINE = 64                      # bytes per rank counter: one cache line each, no false sharing
_SPIN = 64                      # busy checks before yielding: the peer is usually microseconds away
_YIELD_S = 0.005                # then sched_yield for this long, then sleep (a peer checkpointing)
_SLEEP_S = 0.0002


class ShmExchange:
    """Per step: every rank writes an [n] float32 vector, then reads all ranks' vectors [world, n].

    Use: `buf = ex.slot()`, fill `buf`, `all_ = ex.publish()`, read `all_` (no later than the next
    publish). Built by `open_exchange` (collective); not thread-safe.
    """

    def __init__(self, mm: mmap.mmap, rank: int, world: int, n: int, timeout_s: float) -> None:
        self._mm = mm
        # [world] int64 step counters, one per cache line (a strided view of the header).
        self._ctr = np.frombuffer(mm, dtype=np.int64, count=world * _LINE // 8)[:: _LINE // 8]
        # [2 parities, world, n] slots after the header.
        self._slots = torch.frombuffer(mm, dtype=torch.float32, offset=world * _LINE,
                                       count=2 * world * n).view(2, world, n)
        self.rank, self.world, self.n, self.timeout_s = rank, world, n, timeout_s
        self._step = 0

    @staticmethod
    def nbytes(world: int, n: int) -> int:
        return world * _LINE + 2 * world * n * 4

    def slot(self) -> torch.Tensor:
        """This rank's [n] buffer for the next step: write the vector here, then publish()."""
        return self._slots[(self._step + 1) % 2, self.rank]

    def publish(self) -> torch.Tensor:
        """Mark this rank's slot written, wait for every rank -> all slots of this step [world, n]."""
        t = self._step + 1
        self._ctr[self.rank] = t            # an aligned 8-byte store: atomic, ordered after the slot's
        self._wait(t)
        self._step = t
        return self._slots[t % 2]

    def _wait(self, t: int) -> None:
        ctr = self._ctr
        spins, start = 0, 0.0
        while ctr.min() < t:
            spins += 1
            if spins < _SPIN:
                continue
            now = time.monotonic()
            if spins == _SPIN:
                start = now
            elif now - start > self.timeout_s:
                raise TimeoutError(f"shared-memory gradient exchange: rank {self.rank} waited "
                                   f"{self.timeout_s:.0f}s for step {t}; counters {ctr.tolist()}")
            if now - start < _YIELD_S:
                os.sched_yield()
            else:
                time.sleep(_SLEEP_S)

    def close(self) -> None:
        """Unmap the segment (views handed out must be gone, else it stays mapped until collected)."""
        del self._ctr, self._slots
        try:
            self._mm.close()
        except BufferError:             # a caller still holds a view; the mapping goes with it
            pass


def _eligible() -> bool:
    return (platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir(SHM_DIR)
            and os.environ.get("DR_GRADSYNC_SHM", "1") != "0")


def open_exchange(n: int, timeout_s: float = 1800.0) -> ShmExchange | None:
    """Collective over the default process group: a ShmExchange of [n] float32 vectors when every
    rank can map one segment (same host, x86-64, at most 1/4 of /dev/shm's free space), else None
    on every rank.

    Rank 0 creates and reserves the segment under a fresh name, broadcasts the name, every rank
    maps it, and once all have tried (one all_reduce) the name is unlinked: the memory lives as
    long as the mappings, and nothing is left in /dev/shm. DR_GRADSYNC_SHM=0 disables it.
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    size = ShmExchange.nbytes(world, n)
    path = None
    st = os.statvfs(SHM_DIR) if rank == 0 and _eligible() else None
    # At most a quarter of the free /dev/shm: Ray's object store and others live there too.
    if st is not None and size <= st.f_bavail * st.f_frsize // 4:
        path = os.path.join(SHM_DIR, f"dr-gradsync-{uuid.uuid4().hex}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)     # reserve the pages now: ENOSPC here, not SIGBUS later
            finally:
                os.close(fd)
        except OSError:
            if os.path.exists(path):
                os.unlink(path)
            path = None
    box = [path]
    dist.broadcast_object_list(box, src=0)
    path = box[0]
    mm = None
    if path is not None and _eligible():
        try:
            with open(path, "r+b") as f:             # fails on a host that is not rank 0's
                mm = mmap.mmap(f.fileno(), size)
        except OSError:
            mm = None
    ok = torch.tensor([int(mm is not None)])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if rank == 0 and path is not None:
        os.unlink(path)
    if not int(ok.item()):
        if mm is not None:
            mm.close()
        return None
    return ShmExchange(mm, rank, world, n, timeout_s)
