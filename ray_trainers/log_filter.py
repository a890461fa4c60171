"""What the driver prints of its Ray processes' output: their lines minus Ray's own chatter.

Ray forwards every worker's stdout/stderr, and the GCS's and raylets' error logs, to the driver.
On an attached cluster that includes Ray Data's per-dataset notices from processes our logging
config does not reach, the GCS's errors about actors a lost node took with it, and the traceback
Ray Train logs when it shuts down a group whose worker died (its one-line reason is kept); Ray's
"[repeated Nx across cluster]" summaries repeat lines already printed, and two nodes on one host
(tests/test_cluster.py) forward each line twice. The job's own lines pass untouched.
A background thread of Ray's own that dies in one of its actors (Ray Train's placement-group
monitor when the GCS is slow to answer on a loaded host) prints one line, not a 30-line traceback;
a thread whose traceback holds none of Ray's frames is printed whole.
"""
from __future__ import annotations

import os
import re
import time
from collections import OrderedDict
from typing import Any, Callable

# lines that are Ray's, never the job's: matched anywhere in the line
NOISE = re.compile("|".join([
    r"Progress bars disabled\. To enable",                  # Ray Data, once per dataset and process
    r"Dataset \S+ execution finished in [0-9.]+ seconds",   # Ray Data's per-dataset summary
    r"\((?:gcs_server|raylet)\) ",                          # the GCS's / raylets' own error log
    r"\[mutex\.cc : \d+\] RAW: ",                           # abseil's debug lines from Ray's core
    r"\[repeated \d+x across cluster\]",                    # Ray's dedup summary of a line already shown
    r"Failed to query Ray Train Controller actor state",
]))
# a line Ray Train logs before an expected traceback: the line stays, the traceback goes
QUIET_TRACEBACK = re.compile(r"Graceful shutdown of backend failed")
_TRACEBACK_LINE = re.compile(r"^(Traceback \(most recent call last\):|\s|\S*(Error|Exception)\b)")
_TRACEBACK_END = re.compile(r"^[\w.]*(Error|Exception)\b")
# Python's report of an uncaught error in a thread, then its traceback
_THREAD_DIED = re.compile(r"^Exception in thread (.+?):\s*$")
_RAY_FRAME = f"{os.sep}ray{os.sep}"


class RayLogFilter:
    """Filters batches of forwarded lines; an identical line within `window_s` of its first print is dropped."""

    def __init__(self, window_s: float = 600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s, self.clock = window_s, clock
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._skipping = False
        self._thread: list[str] = []          # a thread's traceback being read (it may span batches)

    def _threads(self, lines: list[str]) -> list[str]:
        """Lines with each traceback of a Ray thread (one that has Ray's frames) folded into one line."""
        out = []
        for line in lines:
            if self._thread:
                if _TRACEBACK_LINE.match(line):
                    self._thread.append(line)
                    if _TRACEBACK_END.match(line):
                        out.extend(self._fold())
                    continue
                out.extend(self._thread)          # not a traceback after all: as it came
                self._thread = []
            if _THREAD_DIED.match(line):
                self._thread = [line]
            else:
                out.append(line)
        return out

    def _fold(self) -> list[str]:
        held, self._thread = self._thread, []
        if not any(line.lstrip().startswith("File ") and _RAY_FRAME in line for line in held):
            return held
        name = _THREAD_DIED.match(held[0]).group(1)   # type: ignore[union-attr]
        return [f"[ray] Ray's background thread {name} stopped: {held[-1].strip()}"]

    def keep(self, lines: list[str]) -> list[str]:
        """The lines of one forwarded batch that the user should see, in order."""
        now, out = self.clock(), []
        while self._seen and next(iter(self._seen.values())) < now - self.window_s:
            self._seen.popitem(last=False)
        for line in self._threads(lines):
            if self._skipping:
                if _TRACEBACK_LINE.match(line):
                    self._skipping = not _TRACEBACK_END.match(line)
                    continue
                self._skipping = False
            if NOISE.search(line):
                continue
            if QUIET_TRACEBACK.search(line):
                self._skipping = True
            if line in self._seen:
                continue
            self._seen[line] = now
            out.append(line)
        return out


def install(log_filter: RayLogFilter | None = None) -> bool:
    """Route Ray's log forwarding to the driver through a RayLogFilter (after ray.init); False if this
    Ray has no such hook (then its lines print unfiltered)."""
    try:
        # Ray's only seam for forwarded lines is private: ray_logging's dispatcher of the
        # "ray_print_logs" handler that ray.init installs when log_to_driver is on
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    f = log_filter or RayLogFilter()
    handlers = getattr(dispatcher, "handlers", None)
    lock = getattr(dispatcher, "_lock", None)
    if not isinstance(handlers, list) or lock is None:
        return False

    def wrap(handle: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        def filtered(data: dict[str, Any]) -> None:
            lines = f.keep(list(data.get("lines") or []))
            if lines:
                handle({**data, "lines": lines})
        filtered.dr_filtered = True  # type: ignore[attr-defined]
        return filtered

    with lock:
        dispatcher.handlers = [(name, wrap(h) if name == "ray_print_logs" and not getattr(h, "dr_filtered", False)
                                else h) for name, h in dispatcher.handlers]
        return any(name == "ray_print_logs" for name, _ in dispatcher.handlers)
