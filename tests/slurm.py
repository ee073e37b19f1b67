"""A real Slurm cluster of two nodes on this machine, private to one test session.

munged, slurmctld and two slurmd (`slurmd -N node1`, `-N node2`, both on 127.0.0.1, each on its
own port), started from Debian's packages (slurm-wlm, munge) with a slurm.conf of our own: free
ports, a state folder, spool folders, logs and a munge socket and key under one temporary
folder, so the cluster never meets another Slurm or munged on the machine. Every Slurm command
finds it through SLURM_CONF. No accounting daemon: a job's state comes from `scontrol show job`,
which keeps a finished job for MinJobAge seconds. Needs root (slurmd runs jobs as their user,
munged and slurmd as root). `Cluster.stop()` ends the daemons it started, by their PIDs.
"""
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "scontrol", "scancel", "srun")
NODES = ("node1", "node2")
CPUS = 4  # per node, as slurm.conf says (config_overrides: the machine may have fewer)
GPUS = 2  # per node: counted only, no devices (gres.conf without File=), for --gpus-per-node
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE"}


class SlurmError(RuntimeError):
    pass


def missing():
    """Why a cluster cannot be started here (one line), or None."""
    if os.geteuid() != 0:
        return "needs root (slurmd and munged run as root)"
    gone = [c for c in DAEMONS + COMMANDS + ("mungekey",) if shutil.which(c, path=PATH) is None]
    if gone:
        return (f"needs Slurm and munge ({', '.join(gone)} not found): "
                f"apt-get install slurm-wlm munge")
    return None


PATH = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, folder):
        self.dir = Path(folder)
        self.procs = []
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "PATH": PATH}
        for k in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if k != "SLURM_CONF":
                del self.env[k]

    # -- start and stop ------------------------------------------------------------------------
    def start(self, timeout=60):
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout):
        d = self.dir
        for sub in ("munge", "state", "spool", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d / "munge", 0o700)
        key, sock = d / "munge" / "munge.key", d / "munge" / "munge.socket"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, timeout=30,
                       capture_output=True, env=self.env)
        os.chmod(key, 0o400)
        self._daemon(["munged", "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
                      f"--pid-file={d / 'munge' / 'munged.pid'}",
                      f"--log-file={d / 'log' / 'munged.log'}",
                      f"--seed-file={d / 'munge' / 'munged.seed'}"], "munged")
        self._wait(lambda: sock.exists(), timeout, "munged made no socket", "munged.log")
        ctld_port = _free_port()
        node_ports = {n: _free_port() for n in NODES}
        nodes = "\n".join(f"NodeName={n} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 "
                          f"Port={p} CPUs={CPUS} RealMemory=2000 Gres=gpu:{GPUS} State=UNKNOWN"
                          for n, p in node_ports.items())
        (d / "gres.conf").write_text(f"AutoDetect=off\nName=gpu File=/dev/tty[0-{GPUS - 1}]\n")
        self.conf.write_text(f"""\
ClusterName=gptddptest
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock},cred_expire=5
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}/%n
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'spool'}/slurmd-%n.pid
SlurmctldLogFile={d / 'log' / 'slurmctld.log'}
SlurmdLogFile={d / 'log'}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
GresTypes=gpu
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
InactiveLimit=0
SlurmctldTimeout=300
SlurmdTimeout=300
{nodes}
PartitionName=test Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")
        self._daemon(["slurmctld", "-D", "-i"], "slurmctld")
        for n in NODES:
            self._daemon(["slurmd", "-D", "-N", n], f"slurmd-{n}")
        self._wait(self._nodes_idle, timeout, "the nodes did not come up", "slurmctld.log")

    def _daemon(self, cmd, name):
        log = open(self.dir / "log" / f"{name}.out", "w")
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        proc.name = name
        self.procs.append(proc)

    def _wait(self, ready, timeout, what, log):
        deadline = time.time() + timeout
        while not ready():
            dead = [p.name for p in self.procs if p.poll() is not None]
            if dead or time.time() > deadline:
                raise SlurmError(f"{what} ({', '.join(dead) + ' exited; ' if dead else ''}"
                                 f"see {self.dir / 'log'}):\n{self.logs()}")
            time.sleep(0.2)

    def _nodes_idle(self):
        r = self.command("scontrol", "show", "nodes", "-o", check=False, timeout=30)
        return r.returncode == 0 and len(re.findall(r"State=IDLE\b", r.stdout)) == len(NODES)

    def logs(self, tail=15):
        text = []
        for path in sorted((self.dir / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            text.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(text)

    def stop(self):
        """End the daemons this cluster started (SIGTERM, then SIGKILL), by their PIDs."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.time() + 20
        for proc in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self.procs = []

    # -- commands ------------------------------------------------------------------------------
    def command(self, *args, env=None, timeout=60, check=True):
        r = subprocess.run([str(a) for a in args], env={**self.env, **(env or {})},
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise SlurmError(f"{' '.join(map(str, args))}: exit {r.returncode}: "
                             f"{r.stderr.strip() or r.stdout.strip()}")
        return r

    def sbatch(self, *args, env=None, cwd=None):
        """Submit; returns the job id."""
        r = subprocess.run(["sbatch", "--parsable", *map(str, args)], env={**self.env, **(env or {})},
                           capture_output=True, text=True, timeout=60, cwd=cwd)
        if r.returncode != 0:
            raise SlurmError(f"sbatch {' '.join(map(str, args))}: exit {r.returncode}: {r.stderr}")
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id):
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        out = self.command("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id, states=FINAL, timeout=180):
        """Wait until the job is in one of `states`; returns its record."""
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.time() > deadline:
                raise SlurmError(f"job {job_id} still {info.get('JobState')} after {timeout}s "
                                 f"({info.get('Reason')}):\n{self.logs()}")
            time.sleep(0.3)
