"""Real multi-process clusters on loopback for the system tests: Spark standalone and a 2-node Ray.

Started with the launchers that ship with the pip packages (pyspark's bin/spark-class for the
standalone Master and Workers, `ray start --block` for each Ray node), each in its own process
group so that stopping it stops everything it started and nothing else on the machine.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyspark

BIN = Path(sys.executable).parent
SPARK_HOME = Path(pyspark.__file__).parent
# `ray start --head` turns token authentication on by default; on loopback the nodes and the `dr`
# driver share no token file, so the test cluster runs without (a real cluster keeps it and gives
# the driver RAY_AUTH_TOKEN)
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    """One started daemon: its process group, its log."""

    name: str
    popen: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)

    def stop(self, grace_s: float = 20) -> None:
        if self.popen.poll() is not None:
            return
        os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


def start(name: str, cmd: list[str], logs: Path, env: dict[str, str] | None = None) -> Proc:
    log = logs / f"{name}.log"
    fh = open(log, "w")
    p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                         env={**os.environ, **(env or {})})
    return Proc(name, p, log)


def wait_for(proc: Proc, pattern: str, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if re.search(pattern, proc.text()):
            return
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.text()[-3000:]}")
        time.sleep(0.5)
    raise TimeoutError(f"{proc.name}: no {pattern!r} after {timeout_s}s:\n{proc.text()[-3000:]}")


@dataclass
class SparkStandalone:
    """A standalone Master + `workers` Workers of `cores` cores each on 127.0.0.1."""

    logs: Path
    workers: int = 2
    cores: int = 1
    memory: str = "3g"
    url: str = ""
    procs: list[Proc] = field(default_factory=list)

    def __enter__(self) -> "SparkStandalone":
        try:
            return self._start()
        except BaseException:
            self.__exit__()             # what did start must not outlive a failed start
            raise

    def _start(self) -> "SparkStandalone":
        port = free_port()
        self.url = f"spark://127.0.0.1:{port}"
        cls = str(SPARK_HOME / "bin" / "spark-class")
        env = {"SPARK_HOME": str(SPARK_HOME), "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
        master = start("spark-master", [cls, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                        "--port", str(port), "--webui-port", str(free_port())], self.logs, env)
        self.procs.append(master)
        wait_for(master, r"I have been elected leader")
        for i in range(self.workers):
            work = self.logs / f"spark-work-{i}"
            work.mkdir(exist_ok=True)
            w = start(f"spark-worker-{i}", [cls, "org.apache.spark.deploy.worker.Worker", self.url,
                                            "--host", "127.0.0.1", "--cores", str(self.cores), "--memory", self.memory,
                                            "--webui-port", str(free_port()), "--work-dir", str(work)], self.logs, env)
            self.procs.append(w)
            wait_for(w, r"Successfully registered with master")
        return self

    def worker(self, i: int) -> Proc:
        return self.procs[1 + i]

    def __exit__(self, *exc: object) -> None:
        for p in reversed(self.procs):
            p.stop()


@dataclass
class RayCluster:
    """A Ray head + `workers` worker nodes on 127.0.0.1, `cpus` logical CPUs each."""

    logs: Path
    workers: int = 1
    cpus: int = 3
    address: str = ""
    procs: list[Proc] = field(default_factory=list)

    def _node(self, name: str, args: list[str]) -> Proc:
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(self.cpus),
               "--object-store-memory", str(300 * 2 ** 20), "--disable-usage-stats", *args]
        p = start(name, cmd, self.logs, RAY_ENV)
        self.procs.append(p)
        wait_for(p, r"Ray runtime started|--block")
        return p

    def __enter__(self) -> "RayCluster":
        try:
            return self._start()
        except BaseException:
            self.__exit__()
            raise

    def _start(self) -> "RayCluster":
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self._node("ray-head", ["--head", "--port", str(port), "--include-dashboard", "false"])
        for i in range(self.workers):
            self.add_worker(i)
        self.wait_nodes(1 + self.workers)
        return self

    def add_worker(self, i: int) -> Proc:
        return self._node(f"ray-worker-{i}", ["--address", self.address])

    def alive_nodes(self) -> int:
        out = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{self.address}', logging_level='ERROR');"
                              "print(sum(n['Alive'] for n in ray.nodes()))"], capture_output=True, text=True, timeout=120,
                             env={**os.environ, **RAY_ENV})
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else -1

    def wait_nodes(self, n: int, timeout_s: float = 120) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.alive_nodes() == n:
                return
            time.sleep(2)
        raise TimeoutError(f"Ray cluster at {self.address}: {self.alive_nodes()} alive nodes, expected {n}")

    def __exit__(self, *exc: object) -> None:
        for p in reversed(self.procs):
            p.stop()
