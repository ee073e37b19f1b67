"""slurm/train.sbatch under a real Slurm: munged, slurmctld and two slurmd on this machine
(tests/slurm.py), one cluster for the whole module. The job runs as a user submits it: from the
repository's root, with the virtual environment's bin on PATH (sbatch hands the job the
submitting shell's environment), the CPU line (--cpus-per-task) or the GPU line
(--gpus-per-node; GPUs that the test cluster counts but does not have, so the workers train on
the CPU). Each trained job ends on the weights of a plain torchrun run with the same world size
and OMP_NUM_THREADS. Needs root and Debian's slurm-wlm and munge; skips otherwise (fails under
CI=true)."""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import slurm
from conftest import ROOT, TINY, TORCHRUN, finish, leftovers, ok, same_weights, script_env, start

SCRIPT = ROOT / "slurm" / "train.sbatch"
VENV_BIN = str(Path(sys.executable).parent)  # where torchrun is: the job must find it on PATH
# 40 steps (one epoch is 36 at world size 1 and 18 at 2), a snapshot every 2
FLAGS = TINY + ["--batch-size", "4", "--max-steps", "40", "--save-every", "2"]
STEPS = 40


def require(reason):
    """Skip with one line where no cluster can start here; under CI=true fail instead."""
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but the Slurm tests cannot run: {reason}", pytrace=False)
    pytest.skip(f"Slurm tests: {reason}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require(slurm.missing())
    c = slurm.Cluster(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, token_cache):
    """The --out of a plain `torchrun --standalone` run of FLAGS, by (world size, threads): both
    start at once, beside the first jobs, and are waited for when a test asks."""
    started = {}
    for nproc, threads in ((1, 2), (2, 1)):
        out = tmp_path_factory.mktemp(f"torchrun-{nproc}x{threads}")
        cmd = TORCHRUN + ["--standalone", f"--nproc_per_node={nproc}", "DDP-script-torchrun.py",
                          *map(str, FLAGS), "--out", str(out)]
        started[nproc, threads] = [start(cmd, script_env(token_cache, OMP_NUM_THREADS=threads)),
                                   out, False]

    def get(nproc, threads):
        entry = started[nproc, threads]
        if not entry[2]:
            ok(finish(entry[0], 300))
            entry[2] = True
        return entry[1]
    yield get
    for proc, _, done in started.values():
        if not done:
            finish(proc, 300)


class Job:
    """A submitted job: its id, its working folder (runs/slurm-ID lands there) and output file."""

    def __init__(self, cluster, folder, sbatch=(), args=FLAGS, env=None, cache=None):
        self.cluster, self.dir = cluster, Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.env = script_env(cache, PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
                              PREFLIGHT="0")
        self.env.pop("MASTER_ADDR")
        self.env.update(env or {})
        self.mark = self.env["GPT_DDP_TEST_MARK"]
        self.id = cluster.sbatch(f"--chdir={self.dir}", f"--output={self.dir}/job-%j.out",
                                 *sbatch, SCRIPT, *args, env=self.env, cwd=ROOT)
        self.out = self.dir / "runs" / f"slurm-{self.id}"

    def log(self):
        path = self.dir / f"job-{self.id}.out"
        return path.read_text() if path.exists() else ""

    def wait(self, states=slurm.FINAL, timeout=240):
        info = self.cluster.wait(self.id, states, timeout)
        if info["JobState"] in slurm.FINAL:  # nothing of the job may outlive it
            deadline = time.time() + 10
            while leftovers(self.mark) and time.time() < deadline:
                time.sleep(0.2)
            assert not leftovers(self.mark), f"processes left behind\n{self.log()}"
        return info

    def completed(self, timeout=240):
        info = self.wait(timeout=timeout)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (info, self.log())
        return self.log()

    def wait_for_snapshot(self, timeout=120):
        deadline = time.time() + timeout
        while not (self.out / "ckpt.pt").exists():
            state = self.cluster.job(self.id)["JobState"]
            assert state in ("PENDING", "RUNNING", "CONFIGURING") and time.time() < deadline, \
                f"no snapshot came ({state})\n{self.log()}"
            time.sleep(0.05)


def planned(log):
    """(world size, threads per process) of the training's plan line (torchrun's, not --check's)."""
    found = re.findall(r"plan: world size (\d+) \(gloo on cpu, (\d+) thread\(s\) per process\), "
                       r"started by torchrun", log)
    assert found, log
    return tuple(map(int, found[-1]))


def errors(log):
    return [line for line in log.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------------------------------------
# Problems 1 and 3: the job runs on CPU nodes; workers and threads fit the allocation.

def test_one_node_cpu_job_matches_torchrun(cluster, reference, tmp_path, token_cache):
    """The CPU line on one node: one worker with both CPUs of --cpus-per-task=2 as its threads
    (no --gpus-per-node in the script; no 4 workers on 2 CPUs, no OMP_NUM_THREADS=0)."""
    job = Job(cluster, tmp_path, ["--nodes=1", "--cpus-per-task=2"], cache=token_cache)
    log = job.completed()
    assert planned(log) == (1, 2), log
    assert "1 node(s) x 1 worker(s), 2 thread(s) each" in log
    assert "Invalid value for environment variable OMP_NUM_THREADS" not in log
    assert f"done: {STEPS} steps" in log and not errors(log)
    assert same_weights(reference(1, 2), job.out)


def test_two_node_job_matches_torchrun(cluster, reference, tmp_path, token_cache):
    """Two nodes, one torchrun each (srun), meeting at the first node's address; the preflight
    check first. Keeps the job's output for docs/slurm.md (two-nodes.out beside the test's
    folder)."""
    job = Job(cluster, tmp_path, ["--nodes=2", "--cpus-per-task=1"], cache=token_cache,
              env={"PREFLIGHT": "1", "PREFLIGHT_ARGS": "--sizes 4K 64K"})
    log = job.completed()
    (tmp_path.parent / "two-nodes.out").write_text(log)
    assert job.cluster.job(job.id)["NodeList"] == "node[1-2]"
    assert planned(log) == (2, 1), log
    assert "2 node(s) x 1 worker(s), 1 thread(s) each; rendezvous 127.0.0.1:" in log
    assert "verdict: ok: 2 rank(s)" in log  # preflight.py, before training
    assert "check: all 2 replicas hold identical weights" in log and not errors(log)
    assert same_weights(reference(2, 1), job.out)


# ---------------------------------------------------------------------------------------------
# Problem 4: a port of each job's own. And the GPU line reads the GPUs of the allocation.

def test_two_jobs_on_one_node_at_once(cluster, reference, tmp_path, token_cache):
    """Two jobs on node1 at the same time, each with 2 workers: one by the CPU line
    (NPROC_PER_NODE=2), one by the GPU line (--gpus-per-node=2: two workers, one per GPU, each
    with half of --cpus-per-task). Each meets at its own port: both finish, each on the weights
    of a 2-process run."""
    cpu = Job(cluster, tmp_path / "cpu", ["--nodes=1", "-w", "node1", "--cpus-per-task=2"],
              env={"NPROC_PER_NODE": "2"}, cache=token_cache)
    gpu = Job(cluster, tmp_path / "gpu", ["--nodes=1", "-w", "node1", "--gpus-per-node=2",
                                          "--cpus-per-task=2"], cache=token_cache)
    together = False
    while not together:
        states = [cluster.job(j.id)["JobState"] for j in (cpu, gpu)]
        together = states == ["RUNNING", "RUNNING"]
        if any(s in slurm.FINAL for s in states):
            break
        time.sleep(0.1)
    logs = [cpu.completed(), gpu.completed()]
    assert together, logs
    ports = [re.search(r"rendezvous 127\.0\.0\.1:(\d+) on node1", log).group(1) for log in logs]
    assert ports[0] != ports[1], ports
    for job, log in zip((cpu, gpu), logs):
        assert "1 node(s) x 2 worker(s), 1 thread(s) each" in log, log
        assert planned(log) == (2, 1) and not errors(log), log
        assert same_weights(reference(2, 1), job.out)


# ---------------------------------------------------------------------------------------------
# Problems 2 and 6: what cannot work fails once, with one line.

def test_bad_flag_fails_once_before_torchrun(cluster, tmp_path, token_cache):
    """--check runs before the preflight and before torchrun: one error line, exit 2, seconds;
    no worker ever starts, so torchrun's --max-restarts cannot repeat it."""
    job = Job(cluster, tmp_path, ["--nodes=2"], args=FLAGS + ["--batch-size", "0"],
              env={"PREFLIGHT": "1"}, cache=token_cache)
    info = job.wait()
    log = job.log()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), log
    assert errors(log) == ["error: --batch-size must be at least 1, not 0"], log
    assert "torchrun" not in log and "preflight" not in log and "Traceback" not in log, log
    assert not job.out.exists()


def test_torchrun_not_on_path_is_one_line(cluster, tmp_path, token_cache):
    job = Job(cluster, tmp_path, ["--nodes=1"], env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
              cache=token_cache)
    info = job.wait()
    log = job.log()
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), log
    assert len(errors(log)) == 1 and "torchrun is not on the job's PATH: activate the virtual " \
                                      "environment" in errors(log)[0], log


# ---------------------------------------------------------------------------------------------
# Problem 5: a repeated job ID never resumes another job's run; a requeue resumes its own.

def test_repeated_job_id_does_not_resume(cluster, reference, tmp_path, token_cache):
    """A job held at submission; in its folder, a snapshot as an earlier job of the same ID left
    it (its run_id the old --rdzv-id, the job ID). Released, the job stops at --check with one
    line, exit 2, and the snapshot is untouched."""
    job = Job(cluster, tmp_path, ["--nodes=1", "--hold"], cache=token_cache)
    ckpt = torch.load(reference(2, 1) / "ckpt.pt", map_location="cpu", weights_only=True)
    ckpt["run_id"] = str(job.id)
    job.out.mkdir(parents=True)
    torch.save(ckpt, job.out / "ckpt.pt")
    planted = (job.out / "ckpt.pt").read_bytes()
    cluster.command("scontrol", "release", job.id)
    info = job.wait()
    log = job.log()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), log
    assert errors(log) == [f"error: runs/slurm-{job.id}/ckpt.pt already exists: pass --resume "
                           f"to continue that run, or choose another --out"], log
    assert "resumed" not in log and "started by torchrun" not in log, log
    assert (job.out / "ckpt.pt").read_bytes() == planted
    assert sorted(os.listdir(job.out)) == ["ckpt.pt"]


@pytest.fixture(scope="module")
def interrupted(cluster, tmp_path_factory, token_cache):
    """Two jobs at once, each stopped after its first snapshot: "requeued" by `scontrol requeue`
    (on one node), "warned" by the signal that `#SBATCH --signal=B:USR1@300` sends 5 minutes
    before --time, sent now (`scancel --batch`: to the job script alone; on two nodes)."""
    base = tmp_path_factory.mktemp("interrupted")
    jobs = {"requeued": Job(cluster, base / "requeued", ["--nodes=1", "-w", "node2",
                                                         "--cpus-per-task=2"],
                            env={"NPROC_PER_NODE": "2"}, cache=token_cache),
            "warned": Job(cluster, base / "warned", ["--nodes=2", "--cpus-per-task=1"],
                          cache=token_cache)}
    jobs["requeued"].wait_for_snapshot()
    cluster.command("scontrol", "requeue", jobs["requeued"].id)
    jobs["warned"].wait_for_snapshot()
    cluster.command("scancel", "--signal=USR1", "--batch", jobs["warned"].id)
    return jobs


def test_requeue_resumes(cluster, reference, interrupted):
    """After `scontrol requeue` Slurm starts the job again with SLURM_RESTART_COUNT=1: the same
    job resumes from its own snapshot (not refused as another job's), to the weights of a run
    that never stopped."""
    job = interrupted["requeued"]
    log = job.completed()
    assert cluster.job(job.id)["Restarts"] == "1", log
    assert f"job {job.id} (restart 1)" in log
    # Slurm ends the first allocation with SIGTERM (then SIGKILL after KillWait): the workers
    # save the step they were in, and the requeued job resumes from exactly that one
    stopped = re.findall(r"stopped by SIGTERM after step (\d+);", log)
    assert len(stopped) == 1 and 2 <= int(stopped[0]) < STEPS, log
    assert re.findall(r"resumed from step (\d+) \(epoch", log) == stopped, log
    assert f"done: {STEPS} steps" in log
    assert same_weights(reference(2, 1), job.out)


# ---------------------------------------------------------------------------------------------
# Problem 7: the time limit's warning signal.

def test_time_limit_warning_snapshots_and_requeues(cluster, reference, interrupted):
    """The warning: the workers finish their step, save it and stop; the job requeues itself;
    the next allocation resumes from exactly that step."""
    assert "#SBATCH --signal=B:USR1@300" in SCRIPT.read_text()
    job = interrupted["warned"]
    log = job.completed()
    assert cluster.job(job.id)["Restarts"] == "1", log
    stopped = re.findall(r"stopped by SIGTERM after step (\d+);", log)
    assert len(stopped) == 1 and 2 <= int(stopped[0]) < STEPS, log
    assert f"requeueing job {job.id}: the next allocation resumes from" in log
    assert re.findall(r"resumed from step (\d+) \(epoch", log) == stopped, log
    assert f"done: {STEPS} steps" in log
    assert same_weights(reference(2, 1), job.out)


# ---------------------------------------------------------------------------------------------
# Problem 8: the settings a cluster's network needs, in the job script.

def test_job_script_names_the_network_settings():
    """One line each for Gloo and NCCL; --local-addr per node and the workers' own store (the
    README's c10d settings) are the script's own; the two-node job above runs through them."""
    text = SCRIPT.read_text()
    for knob in ("# export GLOO_SOCKET_IFNAME=", "# export NCCL_SOCKET_IFNAME=",
                 "# export NCCL_IB_DISABLE=1", "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="):
        assert sum(line.startswith(knob) for line in text.splitlines()) == 1, knob
    assert '--local-addr="$(node_addr "$SLURMD_NODENAME")"' in text
    assert "--rdzv-conf=is_host=" in text
    r = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", "-S", "warning", SCRIPT], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stdout


def test_no_slurm_skips_with_one_line_or_fails_under_ci(monkeypatch):
    """Without root (or without Slurm) the module skips with one line; under CI=true it fails."""
    monkeypatch.setattr(slurm.os, "geteuid", lambda: 1000)
    reason = slurm.missing()
    assert reason == "needs root (slurmd and munged run as root)"
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="Slurm tests: needs root"):
        require(reason)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true but the Slurm tests cannot run"):
        require(reason)
