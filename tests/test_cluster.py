"""vtrans.cluster (rank/world/rendezvous derivation) and the sbatch template slurm/vtrans.sbatch.

Unit tests use synthetic environments (torchrun/DeepSpeed variables, or Slurm variables that need
no scontrol). The Slurm path proper runs under a real local cluster (tests/slurm_local.py), as
do the template's signal forwarding and requeue: those are marked ``slurm``.
"""
from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_local import LocalSlurm, slurm_cluster, slurm_cluster_2nodes  # noqa: F401 (fixtures)
from vtrans.cluster import (DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT, PORT_BASE, PORT_SPAN,
                            DistEnv, dist_env, expand_hostlist, export_dist_env,
                            parse_tasks_per_node, slurm_port)

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "slurm" / "vtrans.sbatch"  # one template; the node count is sbatch's --nodes (default 1)
EMPTY_PATH = {"PATH": "/nonexistent"}  # no scontrol reachable: the code must not need it
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "GROUP_RANK",
              "NODE_RANK", "CROSS_RANK", "MASTER_ADDR", "MASTER_PORT")


# --------------------------------------------------------------------------------------------
# unit tests: synthetic environments
# --------------------------------------------------------------------------------------------
def test_single_process_defaults():
    assert dist_env({}) == DistEnv(0, 1, 0, 1, DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT, 0)
    e = dist_env({"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "1234"})
    assert (e.rank, e.world_size, e.master_addr, e.master_port) == (0, 1, "10.1.2.3", 1234)
    assert e.is_main and not e.distributed


def test_torchrun_variables():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
           "GROUP_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29400"}
    assert dist_env(env) == DistEnv(rank=5, world_size=8, local_rank=1, local_world_size=4,
                                    master_addr="node0", master_port=29400, node_rank=1)


def test_deepspeed_launcher_variables():
    # deepspeed.launcher.launch sets LOCAL_SIZE and CROSS_RANK instead of torchrun's names
    env = {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_SIZE": "4",
           "CROSS_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500"}
    e = dist_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size, e.node_rank) == (6, 8, 2, 4, 1)
    assert (e.master_addr, e.master_port) == ("10.0.0.7", 29500)


def test_torchrun_minimal_variables_assume_one_node():
    e = dist_env({"RANK": "1", "WORLD_SIZE": "2"})
    assert e == DistEnv(rank=1, world_size=2, local_rank=0, local_world_size=2,
                        master_addr=DEFAULT_MASTER_ADDR, master_port=DEFAULT_MASTER_PORT,
                        node_rank=0)
    # node rank follows from rank, local rank and local world size when not given
    e = dist_env({"RANK": "7", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"})
    assert e.node_rank == 1


def test_torchrun_wins_over_slurm():
    # torchrun started inside a Slurm step: its per-process values are the real ones
    env = {**EMPTY_PATH, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3",
           "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29501",
           "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0",
           "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu[1-2]"}
    e = dist_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_port) == (3, 4, 3, 29501)


def test_slurm_batch_shell_is_not_a_step():
    # The batch script has SLURM_PROCID=0 and the job's SLURM_NTASKS but runs as one process:
    # taking world_size=4 there would make init_process_group wait forever.
    env = {**EMPTY_PATH, "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0",
           "SLURM_NODEID": "0", "SLURM_JOB_ID": "12", "SLURM_JOB_NODELIST": "n[1-2]",
           "SLURM_TASKS_PER_NODE": "2(x2)"}
    assert dist_env(env) == DistEnv()


def test_slurm_step_values_without_scontrol_when_master_addr_given():
    # Values as srun sets them for task 3 of `srun -N2 -n4` (see the real-cluster tests below);
    # MASTER_ADDR given, so no node list lookup is needed (PATH has no scontrol).
    env = {**EMPTY_PATH, "SLURM_PROCID": "3", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4",
           "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_NTASKS_PER_NODE": "2",
           "SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "n[1-2]", "MASTER_ADDR": "10.9.8.7"}
    assert dist_env(env) == DistEnv(rank=3, world_size=4, local_rank=1, local_world_size=2,
                                    master_addr="10.9.8.7", master_port=PORT_BASE + 1234,
                                    node_rank=1)
    # MASTER_PORT wins over the job-id port
    assert dist_env({**env, "MASTER_PORT": "23456"}).master_port == 23456
    # a one-task step inside a bigger job: the step's values, not the job's stale
    # SLURM_NTASKS_PER_NODE
    one = {**env, "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1",
           "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "1"}
    e = dist_env(one)
    assert (e.rank, e.world_size, e.local_world_size, e.node_rank) == (0, 1, 1, 0)


def test_slurm_node_list_needs_scontrol():
    env = {**EMPTY_PATH, "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2",
           "SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "n[1-2]"}
    with pytest.raises(RuntimeError, match="scontrol"):
        dist_env(env)
    with pytest.raises(RuntimeError, match="scontrol"):
        expand_hostlist("n[1-2]", EMPTY_PATH)


@pytest.mark.parametrize("spec,expected", [
    ("2", [2]), ("2(x3)", [2, 2, 2]), ("2(x2),1", [2, 2, 1]), ("4,3(x2),1", [4, 3, 3, 1])])
def test_parse_tasks_per_node(spec, expected):
    assert parse_tasks_per_node(spec) == expected


def test_parse_tasks_per_node_rejects_garbage():
    with pytest.raises(ValueError):
        parse_tasks_per_node("2x3")


def test_slurm_port_is_deterministic_and_unprivileged():
    assert slurm_port("4242") == slurm_port(4242) == PORT_BASE + 4242
    ports = {slurm_port(j) for j in range(0, 200_000, 7)}
    assert min(ports) >= PORT_BASE >= 1024 and max(ports) < PORT_BASE + PORT_SPAN <= 32768
    assert len(ports) == PORT_SPAN  # the whole range is used
    with pytest.raises(ValueError):
        slurm_port("")


def test_bad_integer_is_reported_with_its_name():
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        dist_env({"RANK": "0", "WORLD_SIZE": "two"})


def test_export_dist_env_round_trips(monkeypatch):
    e = DistEnv(rank=3, world_size=4, local_rank=1, local_world_size=2,
                master_addr="10.0.0.1", master_port=23456, node_rank=1)
    target: dict[str, str] = {}
    export_dist_env(e, target)
    assert {k: target[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                   "MASTER_PORT")} == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "23456"}
    assert dist_env(target) == e
    # default target: os.environ
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
              "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "0")  # recorded, so undone after the test
        monkeypatch.delenv(k)
    export_dist_env(e)
    assert os.environ["RANK"] == "3" and os.environ["MASTER_PORT"] == "23456"
    assert dist_env() == e


def test_module_main_prints_one_json_line():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in _DIST_VARS}
    env.update({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29555", "PYTHONPATH": str(REPO)})
    r = subprocess.run([sys.executable, "-m", "vtrans.cluster"], env=env, capture_output=True,
                       text=True, timeout=60, check=True)
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == {"rank": 1, "world_size": 2, "local_rank": 1,
                                    "local_world_size": 2, "master_addr": "127.0.0.1",
                                    "master_port": 29555, "node_rank": 0}


def test_cluster_module_imports_no_torch_or_deepspeed():
    # loaded on its own (not via vtrans/__init__), in a fresh interpreter
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('c', {str(REPO / 'vtrans' / 'cluster.py')!r})\n"
        "m = sys.modules['c'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(m)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'deepspeed'))\n"
        "print(bad)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, check=True)
    assert r.stdout.strip() == "[]"


def test_sbatch_template_is_portable():
    assert sorted(p.name for p in TEMPLATE.parent.glob("*.sbatch")) == [TEMPLATE.name]
    text = TEMPLATE.read_text()
    r = subprocess.run(["bash", "-n", str(TEMPLATE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for needle in ("#SBATCH --nodes=1\n", "#SBATCH --signal=B:USR1@", "#SBATCH --requeue", "--open-mode=append",
                   "#SBATCH --output=slurm-%x-%j.out", "PYTHON=${PYTHON:-python}",
                   "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}", "SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK",
                   "REQUEUE_ON_USR1", '$PYTHON launch.py "$@"', "##SBATCH --gpus-per-node", "trap "):
        assert needle in text, f"{TEMPLATE.name} lacks {needle!r}"
    assert "/work/" not in text and "/home/" not in text and "/shared/" not in text


# --------------------------------------------------------------------------------------------
# real local Slurm cluster
# --------------------------------------------------------------------------------------------
def job_env(cluster: LocalSlurm, **extra: str) -> dict[str, str]:
    """The cluster's env for sbatch, minus any distributed variables this test process has."""
    env = {k: v for k, v in cluster.env.items() if k not in _DIST_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_batch(cluster: LocalSlurm, workdir: Path, body: str, *sbatch_args: str,
              timeout: float = 60, env: dict | None = None) -> tuple[str, str, str]:
    """Submits a batch script, waits (bounded) for it, returns (job id, final state, output)."""
    script = workdir / "job.sh"
    script.write_text("#!/bin/bash\n" + body)
    out = workdir / "job.out"
    job = cluster.sbatch(f"--output={out}", *sbatch_args, str(script), cwd=workdir,
                         env=env or job_env(cluster))
    state = cluster.wait_job(job, timeout=timeout)
    # the output file is written by slurmstepd; it is complete once the job is
    text = out.read_text() if out.exists() else ""
    return job, state, text


def json_lines(text: str, prefix: str = "") -> list[dict]:
    return [json.loads(line[len(prefix):]) for line in text.splitlines()
            if line.startswith(prefix + "{")]


@pytest.mark.slurm
@pytest.mark.timeout(90)
def test_slurm_one_node_two_tasks(slurm_cluster, tmp_path):
    py = sys.executable
    job, state, out = run_batch(
        slurm_cluster, tmp_path,
        f'echo "BATCH $({py} -m vtrans.cluster)"\n'
        f'srun {py} -m vtrans.cluster\n',
        "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1")
    assert state == "COMPLETED", out
    # the batch shell (not a job step) counts as a single process
    (batch,) = json_lines(out, "BATCH ")
    assert (batch["rank"], batch["world_size"]) == (0, 1)
    tasks = sorted(json_lines(out), key=lambda d: d["rank"])
    assert [t["rank"] for t in tasks] == [0, 1], out
    assert {t["world_size"] for t in tasks} == {2}
    assert sorted(t["local_rank"] for t in tasks) == [0, 1]
    assert {t["local_world_size"] for t in tasks} == {2}
    assert {t["node_rank"] for t in tasks} == {0}
    assert len({(t["master_addr"], t["master_port"]) for t in tasks}) == 1
    assert tasks[0]["master_addr"] == "127.0.0.1"  # n1's NodeAddr
    assert tasks[0]["master_port"] == slurm_port(job)

    # the sacct shim answers what submitit asks
    r = slurm_cluster.run("sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", job)
    assert r.stdout.splitlines() == ["JobID|State|NodeList", f"{job}|COMPLETED|n1"]


@pytest.mark.slurm
@pytest.mark.timeout(90)
def test_slurm_two_nodes_two_tasks_each(slurm_cluster_2nodes, tmp_path):
    py = sys.executable
    job, state, out = run_batch(
        slurm_cluster_2nodes, tmp_path,
        f'srun bash -c \'echo "TASK $SLURMD_NODENAME $({py} -m vtrans.cluster)"\'\n',
        "--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1")
    assert state == "COMPLETED", out
    rows = [line.split(" ", 2) for line in out.splitlines() if line.startswith("TASK ")]
    tasks = {int(d["rank"]): (node, d) for _, node, js in rows for d in [json.loads(js)]}
    assert sorted(tasks) == [0, 1, 2, 3], out
    for rank, (node, d) in tasks.items():
        assert d["world_size"] == 4 and d["local_world_size"] == 2
        assert d["node_rank"] == rank // 2
        assert d["local_rank"] == rank % 2
        assert node == ("n1" if rank < 2 else "n2")
    assert {d["node_rank"] for _, d in tasks.values()} == {0, 1}
    masters = {(d["master_addr"], d["master_port"]) for _, d in tasks.values()}
    assert len(masters) == 1
    ((addr, port),) = masters
    ipaddress.ip_address(addr)  # an IP (n1's NodeAddr), not the node name "n1"
    assert socket.getaddrinfo(addr, port)
    assert port == slurm_port(job)


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_slurm_two_nodes_torch_rendezvous(slurm_cluster_2nodes, tmp_path):
    """The derived values really rendezvous: gloo all_reduce over 2 nodes x 2 tasks."""
    (tmp_path / "ddp.py").write_text(
        "import json, torch, torch.distributed as dist\n"
        "from vtrans.cluster import dist_env, export_dist_env\n"
        "e = dist_env(); export_dist_env(e)\n"
        "dist.init_process_group('gloo', init_method='env://')\n"
        "t = torch.tensor([e.rank + 1.0]); dist.all_reduce(t)\n"
        "print('DDP ' + json.dumps({'rank': dist.get_rank(), 'world': dist.get_world_size(),"
        " 'sum': t.item()}), flush=True)\n"
        "dist.destroy_process_group()\n")
    with socket.socket() as s:  # job ids repeat across concurrent clusters: pick a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job, state, out = run_batch(
        slurm_cluster_2nodes, tmp_path, f"srun {sys.executable} ddp.py\n",
        "--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", timeout=100,
        env=job_env(slurm_cluster_2nodes, MASTER_PORT=str(port)))
    assert state == "COMPLETED", out
    rows = sorted(json_lines(out, "DDP "), key=lambda d: d["rank"])
    assert rows == [{"rank": r, "world": 4, "sum": 10.0} for r in range(4)], out


LAUNCH_PY = '''\
"""Stand-in for the project's launch.py: records signals and restarts, then idles."""
import json, os, signal, sys, time
rank = os.environ["SLURM_PROCID"]
restart = os.environ.get("SLURM_RESTART_COUNT", "0")
tag = f"r{rank}-restart{restart}"
def on_signal(sig, frame):
    name = signal.Signals(sig).name
    with open(f"got-{name}-{tag}", "a") as f:
        f.write(f"{time.time()}\\n")
    if sig == signal.SIGTERM:
        time.sleep(1.0)  # "checkpointing": must not be cut short by SIGKILL
        open(f"saved-{tag}", "w").write("ok")
        sys.exit(0)
signal.signal(signal.SIGUSR1, on_signal)
signal.signal(signal.SIGTERM, on_signal)
with open(f"args-{tag}", "w") as f:
    json.dump(sys.argv[1:], f)
open(f"ready-{tag}", "w").write(str(os.getpid()))
if os.environ.get("EXIT_CODE"):
    sys.exit(int(os.environ["EXIT_CODE"]))
deadline = time.time() + 60
while time.time() < deadline:
    time.sleep(0.05)
'''


def wait_files(d: Path, pattern: str, n: int, timeout: float = 30.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(d.glob(pattern))
        if len(found) >= n:
            return found
        time.sleep(0.1)
    raise TimeoutError(f"{n} x {pattern} not in {d} after {timeout}s: "
                       f"{sorted(p.name for p in d.iterdir())}")


def submit_template(cluster: LocalSlurm, submit_dir: Path, *args: str, nodes: int | None = None,
                    **env: str) -> str:
    """sbatch slurm/vtrans.sbatch with 2 tasks per node; without `nodes`, the template's own node count (1)."""
    (submit_dir / "launch.py").write_text(LAUNCH_PY)
    node_args = [f"--nodes={nodes}"] if nodes else []
    return cluster.sbatch(*node_args, "--ntasks-per-node=2", "--cpus-per-task=1",
                          "--time=5", str(TEMPLATE), *args, cwd=submit_dir,
                          env=job_env(cluster, PYTHON=sys.executable, **env))


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_template_forwards_signals_and_requeues(slurm_cluster, tmp_path):
    c = slurm_cluster
    job = submit_template(c, tmp_path, "trainer.x=1", "+y=two words")
    wait_files(tmp_path, "ready-*-restart0", 2)
    log = tmp_path / f"slurm-vtrans-{job}.out"  # relative to the submit dir
    assert json.loads((tmp_path / "args-r0-restart0").read_text()) == ["trainer.x=1", "+y=two words"]

    # USR1 to the batch shell only (what --signal=B:USR1@120 does at the time limit):
    # the trap forwards it through srun to both tasks
    c.run("scancel", "--batch", "--signal=USR1", job)
    wait_files(tmp_path, "got-SIGUSR1-*-restart0", 2, timeout=15)
    assert "batch shell got SIGUSR1" in log.read_text()
    # USR1 to the job steps (scancel -s USR1 without --batch) reaches the tasks directly
    c.run("scancel", "--signal=USR1", job)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not all(
            len(p.read_text().split()) >= 2 for p in tmp_path.glob("got-SIGUSR1-*-restart0")):
        time.sleep(0.1)
    assert [len(p.read_text().split()) for p in
            sorted(tmp_path.glob("got-SIGUSR1-*-restart0"))] == [2, 2]
    assert c.job_state(job) == "RUNNING"  # USR1 is a warning, not an end

    # requeue: every task gets TERM and has time to "checkpoint"; the job comes back
    c.run("scontrol", "requeue", job)
    wait_files(tmp_path, "saved-*-restart0", 2, timeout=20)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and c.job_state(job) != "PENDING":
        time.sleep(0.2)
    assert c.job_state(job) == "PENDING"
    assert "Restarts=1" in c.run("scontrol", "show", "job", job).stdout
    c.run("scontrol", "update", f"jobid={job}", "starttime=now")  # skip the requeue delay
    wait_files(tmp_path, "ready-*-restart1", 2, timeout=30)
    assert json.loads((tmp_path / "args-r1-restart1").read_text()) == ["trainer.x=1",
                                                                     "+y=two words"]
    text = log.read_text()  # --open-mode=append: both runs in one log
    assert f"job {job} (restart 0)" in text and f"job {job} (restart 1)" in text
    assert "job ending, waiting for tasks to exit" in text
    c.run("scancel", job)
    assert c.wait_job(job, timeout=30) == "CANCELLED"


@pytest.mark.slurm
@pytest.mark.timeout(90)
def test_template_term_to_batch_shell_reaches_tasks(slurm_cluster, tmp_path):
    # TERM to the batch shell alone must reach the tasks as TERM (not srun's SIGKILL)
    c = slurm_cluster
    job = submit_template(c, tmp_path)
    wait_files(tmp_path, "ready-*-restart0", 2)
    c.run("scancel", "--batch", "--signal=TERM", job)
    wait_files(tmp_path, "saved-*-restart0", 2, timeout=20)
    assert c.wait_job(job, timeout=30) == "COMPLETED"
    assert "forwarding to all tasks" in (tmp_path / f"slurm-vtrans-{job}.out").read_text()


@pytest.mark.slurm
@pytest.mark.timeout(60)
def test_template_exits_with_step_status(slurm_cluster, tmp_path):
    c = slurm_cluster
    job = submit_template(c, tmp_path, EXIT_CODE="3")
    assert c.wait_job(job, timeout=40) == "FAILED"
    assert "ExitCode=3:0" in c.run("scontrol", "show", "job", job).stdout
    assert "job step exited with status 3" in (tmp_path / f"slurm-vtrans-{job}.out").read_text()


@pytest.mark.slurm
@pytest.mark.timeout(90)
def test_submitit_runs_against_local_cluster(slurm_cluster, tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    for k, v in job_env(slurm_cluster).items():
        monkeypatch.setenv(k, v)
    ex = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    ex.update_parameters(slurm_partition=slurm_cluster.partition, nodes=1, tasks_per_node=1,
                         cpus_per_task=1, timeout_min=5)
    job = ex.submit(pow, 2, 10)
    assert job.result() == 1024
    # submitit reads states with `sacct` (here: the shim); the result can come before the end
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and job.get_info(mode="force").get("State") != "COMPLETED":
        time.sleep(0.3)
    assert job.get_info(mode="force").get("State") == "COMPLETED"
    assert job.done()


@pytest.mark.slurm
@pytest.mark.timeout(90)
def test_multi_node_template_signals_every_task(slurm_cluster_2nodes, tmp_path):
    c = slurm_cluster_2nodes
    job = submit_template(c, tmp_path, nodes=2)
    wait_files(tmp_path, "ready-*-restart0", 4)
    c.run("scancel", "--batch", "--signal=USR1", job)
    got = wait_files(tmp_path, "got-SIGUSR1-*-restart0", 4, timeout=15)
    assert [p.name for p in got] == [f"got-SIGUSR1-r{r}-restart0" for r in range(4)]
    c.run("scancel", job)  # TERM to all: every task, on both nodes, finishes its "checkpoint"
    wait_files(tmp_path, "saved-*-restart0", 4, timeout=20)
    assert c.wait_job(job, timeout=30) == "CANCELLED"
