"""A throwaway Slurm cluster (munged + slurmctld + one slurmd per "node") on this host, for tests.

Everything lives under one folder; ports are picked free at start so concurrent test runs do not
collide; ``stop()`` ends exactly the daemons it started, by PID. Needs the Debian/Ubuntu
``slurmctld slurmd slurm-client munge`` packages (scripts/install_slurm.sh); runs as root or as a
plain user (SlurmUser/SlurmdUser = that user, jobs run as that user).
"""
from __future__ import annotations

import getpass
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Daemons live in sbin, which is often not on a non-root PATH.
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "sinfo", "scancel")


def missing_binaries() -> list[str]:
    """Slurm/munge executables not found (empty when a local cluster can be started)."""
    return [b for b in DAEMONS + CLIENTS if shutil.which(b, path=_SEARCH_PATH) is None]


def _free_ports(n: int) -> list[int]:
    """n distinct currently-free TCP ports on all interfaces (held open together, then released)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


# `sacct` stand-in for clusters without accounting (submitit polls
# `sacct -o JobID,State,NodeList --parsable2 -j ID [-j ID...]`). Answers from squeue, which knows
# every job still held by slurmctld (MinJobAge below keeps finished ones for an hour).
_SACCT_SHIM = r'''#!{python}
"""sacct shim: answers from `squeue -h -t all`; only fields squeue knows are filled."""
import subprocess, sys

FIELDS = {{"jobid": "%i", "jobidraw": "%A", "state": "%T", "nodelist": "%N", "jobname": "%j",
          "partition": "%P", "user": "%u", "elapsed": "%M", "ncpus": "%C", "nnodes": "%D",
          "start": "%S", "end": "%e", "submit": "%V", "reason": "%r", "exitcode": "%E"}}
args = sys.argv[1:]
fmt = "JobID,State,NodeList"
jobs = []
header = True
i = 0
while i < len(args):
    a = args[i]
    if a in ("-o", "--format", "-j", "--jobs") and i + 1 < len(args):
        val = args[i + 1]
        i += 2
    elif a.startswith(("--format=", "--jobs=")):
        val = a.split("=", 1)[1]
        i += 1
    else:
        if a in ("-n", "--noheader"):
            header = False
        i += 1
        continue
    if a.lstrip("-").startswith(("o", "format")):
        fmt = val
    else:
        jobs += [j for j in val.split(",") if j]
names = [f.split("%")[0] for f in fmt.split(",") if f]
codes = [FIELDS.get(n.lower(), "") for n in names]
out = ["|".join(names)] if header else []
if jobs or not any(a in ("-j", "--jobs") or a.startswith("--jobs=") for a in args):
    cmd = ["squeue", "-h", "-t", "all", "-o", "|".join(c or "%%" for c in codes) + "|"]
    if jobs:
        cmd += ["-j", ",".join(jobs)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    for line in r.stdout.splitlines():
        vals = line.split("|")[:len(codes)]
        out.append("|".join("" if not c else v for c, v in zip(codes, vals)))
print("\n".join(out))
'''


class LocalSlurm:
    """A Slurm cluster of ``nodes`` slurmd's (n1, n2, ...) on 127.0.0.1, rooted at ``root``.

    ``env`` is what a Slurm command or test subprocess needs (SLURM_CONF, PATH with the sacct
    shim first). Use as a context manager or call start()/stop().
    """

    def __init__(self, root: Path, nodes: int = 1, cpus_per_node: int = 2,
                 partition: str = "debug", start_timeout: float = 30.0):
        if nodes < 1:
            raise ValueError("nodes must be >= 1")
        self.root = Path(root).resolve()
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.partition = partition
        self.start_timeout = start_timeout
        self.node_names = [f"n{i + 1}" for i in range(nodes)]
        self.conf = self.root / "etc" / "slurm.conf"
        self.bin_dir = self.root / "bin"
        self.log_dir = self.root / "log"
        self._procs: list[tuple[str, subprocess.Popen]] = []
        self._short_dir: Path | None = None
        self.run_dir = self.root / "run"
        self.env: dict[str, str] = {}

    # -- helpers ---------------------------------------------------------------------------------
    def _bin(self, name: str) -> str:
        path = shutil.which(name, path=_SEARCH_PATH)
        if path is None:
            raise FileNotFoundError(f"{name} not found (install: scripts/install_slurm.sh)")
        return path

    def run(self, *cmd: str, check: bool = True, timeout: float = 30.0,
            **kw) -> subprocess.CompletedProcess:
        """Runs a command against this cluster (env set), capturing text output."""
        r = subprocess.run(list(cmd), env=kw.pop("env", self.env), capture_output=True,
                           text=True, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.console", "ab")
        p = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._procs.append((name, p))
        return p

    def _check_alive(self) -> None:
        for name, p in self._procs:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}\n{self.logs()}")

    def logs(self, tail: int = 30) -> str:
        """Last lines of every daemon log (for failure messages)."""
        parts = []
        for f in sorted(self.log_dir.glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> "LocalSlurm":
        if self._procs:
            raise RuntimeError("already started")
        for d in ("etc", "bin", "log", "state"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        # Unix sockets (munge, slurmstepd) must have short paths (< 108 bytes).
        if len(str(self.run_dir)) > 50:
            self._short_dir = Path(tempfile.mkdtemp(prefix="vslurm-"))
            self.run_dir = self._short_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        munge_dir = self.run_dir / "munge"
        munge_dir.mkdir(exist_ok=True)
        (self.run_dir / "spool").mkdir(exist_ok=True)
        os.chmod(self.run_dir, 0o755)
        os.chmod(munge_dir, 0o755)  # munged: "execute permissions for all required"
        key = self.root / "etc" / "munge.key"
        if not key.exists():
            key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, stat.S_IRUSR | stat.S_IWUSR)
        self.munge_socket = munge_dir / "munge.socket.2"

        ctld_port, *node_ports = _free_ports(1 + self.nodes)
        self.ctld_port = ctld_port
        self.first_job_id = 1000 + secrets.randbelow(1_000_000)
        self.node_ports = node_ports
        self._write_conf()
        self._write_sacct_shim()
        self.env = {
            **os.environ,
            "SLURM_CONF": str(self.conf),
            "PATH": os.pathsep.join([str(self.bin_dir), _SEARCH_PATH]),
        }
        # A parent's job environment (tests run inside a Slurm job) must not leak into ours.
        for k in list(self.env):
            if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF":
                del self.env[k]

        try:
            self._spawn("munged", [
                self._bin("munged"), "--foreground", "--force",
                f"--socket={self.munge_socket}", f"--key-file={key}",
                f"--log-file={self.log_dir / 'munged.log'}",
                f"--pid-file={self.run_dir / 'munged.pid'}",
                f"--seed-file={self.root / 'state' / 'munge.seed'}",
            ])
            self._wait(lambda: self.munge_socket.exists(), "munged socket")
            self._spawn("slurmctld", [self._bin("slurmctld"), "-D", "-c", "-f", str(self.conf)])
            self._wait(lambda: self.run("scontrol", "ping", check=False, timeout=10)
                       .stdout.count("UP") > 0, "slurmctld ping")
            for name in self.node_names:
                self._spawn(f"slurmd-{name}",
                            [self._bin("slurmd"), "-D", "-N", name, "-f", str(self.conf)])

            def all_idle() -> bool:
                out = self.run("sinfo", "-h", "-N", "-t", "idle", "-o", "%N", check=False).stdout
                return set(out.split()) >= set(self.node_names)
            self._wait(all_idle, "all nodes idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, cond, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if cond():
                return
            time.sleep(0.2)
        raise TimeoutError(f"local slurm: timed out waiting for {what}\n{self.logs()}")

    def _write_conf(self) -> None:
        r, user = self.root, getpass.getuser()
        nodes = "\n".join(
            f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={self.cpus_per_node} RealMemory=1000 State=UNKNOWN"
            for n, port in zip(self.node_names, self.node_ports))
        self.conf.write_text(f"""\
# generated by tests/slurm_local.py
ClusterName=vt{os.getpid() % 100000}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={self.run_dir}/spool/%n
SlurmctldPidFile={self.run_dir}/slurmctld.pid
SlurmdPidFile={self.run_dir}/slurmd-%n.pid
SlurmctldLogFile={self.log_dir}/slurmctld.log
SlurmdLogFile={self.log_dir}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
MinJobAge=3600
# distinct job ids (and so job-id-derived ports) across concurrent test clusters
FirstJobId={self.first_job_id}
KillWait=5
SchedulerParameters=sched_interval=1
SlurmctldTimeout=30
SlurmdTimeout=30
{nodes}
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _write_sacct_shim(self) -> None:
        shim = self.bin_dir / "sacct"
        shim.write_text(_SACCT_SHIM.format(python=sys.executable))
        shim.chmod(0o755)

    def stop(self) -> None:
        """Cancels this cluster's jobs, then ends the daemons it started (by PID, TERM then KILL)."""
        if not self._procs:
            return
        ctld_alive = any(n == "slurmctld" and p.poll() is None for n, p in self._procs)
        if ctld_alive:
            try:  # job steps are slurmstepd's (not our children): let slurmd end them first
                ids = self.run("squeue", "-h", "-o", "%A", check=False, timeout=10).stdout.split()
                if ids:
                    self.run("scancel", *ids, check=False, timeout=10)
                    deadline = time.monotonic() + 10
                    while time.monotonic() < deadline and self.run(
                            "squeue", "-h", "-t", "RUNNING,COMPLETING,PENDING", "-o", "%A",
                            check=False, timeout=10).stdout.strip():
                        time.sleep(0.3)
            except (subprocess.SubprocessError, OSError):
                pass
        # slurmd's before slurmctld before munged (reverse start order)
        for name, p in reversed(self._procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        self._procs.clear()
        if self._short_dir is not None:
            shutil.rmtree(self._short_dir, ignore_errors=True)
            self._short_dir = None
            self.run_dir = self.root / "run"

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- job helpers -----------------------------------------------------------------------------
    def sbatch(self, *args: str, cwd: Path | str | None = None, env: dict | None = None) -> str:
        """Submits a batch job (``sbatch --parsable ARGS``) and returns its job id."""
        r = self.run("sbatch", "--parsable", *args, cwd=cwd, env=env or self.env)
        return r.stdout.strip().split(";")[0]

    def job_state(self, job_id: str) -> str:
        r = self.run("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T", check=False)
        return r.stdout.strip().splitlines()[0] if r.stdout.strip() else "UNKNOWN"

    def wait_job(self, job_id: str, timeout: float = 60.0,
                 until: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                           "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                                           "BOOT_FAIL", "DEADLINE")) -> str:
        """Polls until the job reaches one of ``until``; returns that state, or raises."""
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in until:
                return state
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} still {state} after {timeout}s\n{self.logs()}")


def _cluster_fixture(tmp_path_factory, nodes: int):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm binaries not installed ({', '.join(missing)}); "
                    "run scripts/install_slurm.sh")
    root = tmp_path_factory.mktemp(f"slurm{nodes}n")
    cluster = LocalSlurm(root, nodes=nodes, cpus_per_node=2)
    cluster.start()
    return cluster


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A running 1-node local Slurm cluster (skips only when Slurm is not installed)."""
    cluster = _cluster_fixture(tmp_path_factory, 1)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def slurm_cluster_2nodes(tmp_path_factory):
    """A running 2-node (n1, n2) local Slurm cluster (skips only when Slurm is not installed)."""
    cluster = _cluster_fixture(tmp_path_factory, 2)
    try:
        yield cluster
    finally:
        cluster.stop()
