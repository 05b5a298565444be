"""Where this process sits in a distributed job: rank, world size, rendezvous address and port.

Derived from torchrun/DeepSpeed variables, else a Slurm job step (srun), else one process alone.
``python -m vtrans.cluster`` prints the result as one JSON line.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from typing import Mapping, MutableMapping

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
# Ports derived from SLURM_JOB_ID fall in [PORT_BASE, PORT_BASE + PORT_SPAN): unprivileged and
# below Linux's default ephemeral range (32768-60999), so they rarely meet a client socket.
PORT_BASE = 15000
PORT_SPAN = 16384
_SCONTROL_TIMEOUT_S = 30


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = DEFAULT_MASTER_ADDR
    master_port: int = DEFAULT_MASTER_PORT
    node_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the process that should write logs, checkpoints, outputs)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(environ: Mapping[str, str], *names: str, default: int | None = None) -> int | None:
    """First of ``names`` set to an integer in ``environ`` (else ``default``)."""
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError as e:
                raise ValueError(f"{name}={value!r} is not an integer") from e
    return default


def parse_tasks_per_node(spec: str) -> list[int]:
    """Expands Slurm's tasks-per-node notation: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if not m:
            raise ValueError(f"bad tasks-per-node spec {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _scontrol(*args: str, environ: Mapping[str, str]) -> str | None:
    exe = shutil.which("scontrol", path=environ.get("PATH", os.defpath))
    if exe is None:
        return None
    try:
        r = subprocess.run([exe, *args], capture_output=True, text=True, env=dict(environ),
                           timeout=_SCONTROL_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def expand_hostlist(nodelist: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """Host names of a Slurm node list (``"n[1-3],gpu7"``), via ``scontrol show hostnames``."""
    environ = os.environ if environ is None else environ
    out = _scontrol("show", "hostnames", nodelist, environ=environ)
    if out is None:
        raise RuntimeError(f"cannot expand Slurm node list {nodelist!r}: `scontrol show "
                           "hostnames` failed or scontrol is not on PATH")
    return out.split()


def node_addr(node: str, environ: Mapping[str, str] | None = None) -> str:
    """The node's NodeAddr as Slurm knows it (node names need not resolve); ``node`` if unknown."""
    environ = os.environ if environ is None else environ
    out = _scontrol("show", "node", "-o", node, environ=environ)
    m = re.search(r"(?:^|\s)NodeAddr=(\S+)", out or "")
    return m.group(1) if m else node


def slurm_port(job_id: str | int) -> int:
    """A rendezvous port that every task of job ``job_id`` derives alike, without talking."""
    digits = re.sub(r"\D", "", str(job_id))
    if not digits:
        raise ValueError(f"bad SLURM_JOB_ID {job_id!r}")
    return PORT_BASE + int(digits) % PORT_SPAN


def _from_torchrun(e: Mapping[str, str]) -> DistEnv:
    rank = _int(e, "RANK")
    world_size = _int(e, "WORLD_SIZE")
    local_rank = _int(e, "LOCAL_RANK", default=0)
    # torchrun: LOCAL_WORLD_SIZE/GROUP_RANK; deepspeed launcher: LOCAL_SIZE/CROSS_RANK
    # (absent: assume one node)
    local_world_size = _int(e, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=world_size)
    node_rank = _int(e, "GROUP_RANK", "NODE_RANK", "CROSS_RANK",
                     default=(rank - local_rank) // max(local_world_size, 1))
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank,
                   local_world_size=local_world_size,
                   master_addr=e.get("MASTER_ADDR") or DEFAULT_MASTER_ADDR,
                   master_port=_int(e, "MASTER_PORT", default=DEFAULT_MASTER_PORT),
                   node_rank=node_rank)


def _from_slurm(e: Mapping[str, str]) -> DistEnv:
    rank = _int(e, "SLURM_PROCID")
    world_size = _int(e, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS", default=1)
    local_rank = _int(e, "SLURM_LOCALID", default=0)
    node_rank = _int(e, "SLURM_NODEID", default=0)  # relative to the step's nodes
    # The step's own values first: SLURM_NTASKS_PER_NODE keeps the job's value inside a
    # smaller step.
    spec = e.get("SLURM_STEP_TASKS_PER_NODE") or e.get("SLURM_TASKS_PER_NODE")
    if spec:
        counts = parse_tasks_per_node(spec)
        local_world_size = counts[node_rank] if node_rank < len(counts) else counts[-1]
    else:
        local_world_size = _int(e, "SLURM_NTASKS_PER_NODE", default=world_size)
    master_addr = e.get("MASTER_ADDR")
    if not master_addr:
        nodelist = (e.get("SLURM_STEP_NODELIST") or e.get("SLURM_JOB_NODELIST")
                    or e.get("SLURM_NODELIST"))
        if nodelist:
            master_addr = node_addr(expand_hostlist(nodelist, e)[0], e)
        else:
            master_addr = DEFAULT_MASTER_ADDR
    port = _int(e, "MASTER_PORT")
    if port is None:
        job_id = e.get("SLURM_JOB_ID") or e.get("SLURM_JOBID")
        port = slurm_port(job_id) if job_id else DEFAULT_MASTER_PORT
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank,
                   local_world_size=local_world_size, master_addr=master_addr,
                   master_port=port, node_rank=node_rank)


def dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """This process's DistEnv, from ``environ`` (default ``os.environ``).

    1. torchrun / DeepSpeed launcher (RANK and WORLD_SIZE set): their values.
    2. A Slurm job step (srun: SLURM_PROCID and SLURM_STEP_ID set): SLURM_* values; the master
       is the first node of the step's node list, by its NodeAddr (``scontrol show node``); the
       port comes from SLURM_JOB_ID unless MASTER_PORT is set (MASTER_ADDR, if set, wins too).
       A batch script outside srun is not a step: it counts as one process alone.
    3. Otherwise one process: rank 0 of 1 (MASTER_ADDR/MASTER_PORT honoured if set).
    """
    e = os.environ if environ is None else environ
    if e.get("RANK", "").strip() and e.get("WORLD_SIZE", "").strip():
        return _from_torchrun(e)
    if e.get("SLURM_PROCID", "").strip() and (e.get("SLURM_STEP_ID") or e.get("SLURM_STEPID")):
        return _from_slurm(e)
    return DistEnv(master_addr=e.get("MASTER_ADDR") or DEFAULT_MASTER_ADDR,
                   master_port=_int(e, "MASTER_PORT", default=DEFAULT_MASTER_PORT))


def export_dist_env(env: DistEnv, environ: MutableMapping[str, str] | None = None) -> None:
    """Sets the variables torch.distributed (env://) and DeepSpeed read, in ``os.environ``."""
    e = os.environ if environ is None else environ
    e.update({
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.local_world_size),
        "GROUP_RANK": str(env.node_rank),
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
    })


def main() -> None:
    print(json.dumps(asdict(dist_env())), flush=True)


if __name__ == "__main__":
    main()
