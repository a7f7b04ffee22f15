"""A single-node SLURM cluster on this machine, for tests that submit real jobs.

Debian's slurmctld, slurmd, slurm-client and munge packages (installed with apt-get
when missing and we are root). Everything lives in a fresh folder under /tmp: the
munge key and socket, slurm.conf, state, spool and logs. The daemons run in the foreground
under `timeout`, so that they stop by themselves even if the test process is killed.

Client commands find the cluster through SLURM_CONF (`SlurmCluster.env`), except in
the jobs: the executor plugin's job step runs each job with `srun` in an environment
stripped of every SLURM_* variable, SLURM_CONF included, so that srun reads the default
/etc/slurm/slurm.conf, as on a real cluster. That path is linked to this cluster's
slurm.conf while it runs; a machine with its own /etc/slurm/slurm.conf is left alone
(`start` refuses, the tests skip).

No accounting database (slurmdbd): `sacct` answers "Slurm accounting storage is
disabled", so job states come from `squeue` (finished jobs stay listed for MinJobAge
seconds) and every finished job is also written to a job-completion text file.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
COMMANDS = ["slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel", "munged"]
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
LIFETIME_S = 1800  # the daemons stop after this, whatever happens to the test process
MIN_JOB_AGE_S = 600  # how long squeue keeps listing finished jobs


def _missing() -> list[str]:
    return [c for c in COMMANDS if shutil.which(c) is None and not Path("/usr/sbin", c).exists()]


def ensure_installed() -> str | None:
    """Install the SLURM and munge packages if needed; a reason to skip, or None."""
    if not _missing():
        if os.geteuid() != 0:
            return "slurmd must run as root to start jobs, and the tests are not run as root"
        return None
    if os.geteuid() != 0:
        return f"SLURM is not installed ({', '.join(_missing())} missing) and we are not root to install it"
    if shutil.which("apt-get") is None:
        return f"SLURM is not installed ({', '.join(_missing())} missing) and there is no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd, timeout in (
        (["apt-get", "update"], 300),
        (["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], 900),
    ):
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` took more than {timeout} s"
        if result.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {(result.stderr or result.stdout).strip()[-500:]}"
    if _missing():
        return (
            f"apt-get installed {' '.join(PACKAGES)} but {', '.join(_missing())} are still missing"
        )
    return None


class ClusterUnavailable(RuntimeError):
    """This machine cannot host the test cluster (a reason to skip, not a failure)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """One node (this machine: its CPUs and memory) in the given partitions, the first
    being the default one."""

    def __init__(self, partitions=("cpu",), cluster_name: str = "sam2pal"):
        self.partitions = list(partitions)
        self.cluster_name = cluster_name
        self.node = socket.gethostname().split(".")[0]  # hostname -s
        self.cpus = os.cpu_count() or 1
        self.memory_mb = memory_mb()
        # munged wants every folder above its socket searchable by all: not under
        # pytest's tmp (mode 0700)
        self.root = Path(tempfile.mkdtemp(prefix="sam2pal-slurm-", dir="/tmp"))
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.jobcomp = self.root / "log" / "jobcomp.txt"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._procs: list[tuple[str, subprocess.Popen]] = []
        self._linked = False

    # -- set-up --------------------------------------------------------------------------

    def _write_files(self):
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(mode=0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        nodes = self.node
        partitions = "\n".join(
            f"PartitionName={name} Nodes={nodes} Default={'YES' if i == 0 else 'NO'} MaxTime=INFINITE State=UP"
            for i, name in enumerate(self.partitions)
        )
        root = self.root
        self.conf.write_text(f"""\
ClusterName={self.cluster_name}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=60
SlurmdTimeout=120
InactiveLimit=0
KillWait=5
MinJobAge={MIN_JOB_AGE_S}
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
{partitions}
""")

    def _start(self, name: str, *args: str):
        log = open(self.root / "log" / f"{name}.out", "wb")
        proc = subprocess.Popen(
            ["timeout", "-k", "10", str(LIFETIME_S), _which(name), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
        )
        log.close()
        self._procs.append((name, proc))
        return proc

    def _wait(self, what: str, ready, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} stopped (exit {proc.returncode}) before {what}:\n{self.logs()}"
                    )
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"no {what} after {timeout:.0f} s:\n{self.logs()}")

    def start(self, timeout: float = 90):
        if SYSTEM_CONF.exists() or SYSTEM_CONF.is_symlink():
            raise ClusterUnavailable(
                f"{SYSTEM_CONF} exists: this machine has its own SLURM configuration, "
                "which srun in the jobs would read instead of the test cluster's"
            )
        self._write_files()
        SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SYSTEM_CONF.symlink_to(self.conf)
        self._linked = True
        m = self.root / "munge"
        self._start(
            "munged",
            "-F",
            "--num-threads=4",
            f"--key-file={m / 'munge.key'}",
            f"--socket={self.munge_socket}",
            f"--pid-file={m / 'munged.pid'}",
            f"--log-file={m / 'munged.log'}",
            f"--seed-file={m / 'munged.seed'}",
        )
        self._wait("munge socket", self.munge_socket.exists, timeout)
        self._start("slurmctld", "-D", "-f", str(self.conf))
        self._start("slurmd", "-D", "-f", str(self.conf), "-N", self.node)
        self._wait(f"idle node {self.node} in sinfo", self.node_idle, timeout)
        return self

    # -- use -----------------------------------------------------------------------------

    def run(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, env=self.env
        )

    def node_idle(self) -> bool:
        try:
            result = self.run("sinfo", "-h", "-N", "-o", "%N %T", timeout=10)
        except subprocess.TimeoutExpired:
            return False
        states = {
            line.split()[1]
            for line in result.stdout.splitlines()
            if line.split()[:1] == [self.node]
        }
        return result.returncode == 0 and states == {"idle"}

    def jobs(self, name: str | None = None) -> list[dict[str, str]]:
        """The jobs squeue knows (finished ones for MinJobAge seconds), optionally only
        those of one job name."""
        fields = {
            "id": "%i",
            "name": "%j",
            "comment": "%k",
            "partition": "%P",
            "account": "%a",
            "state": "%T",
            "memory": "%m",
            "time_limit": "%l",
            "cpus": "%C",
        }
        cmd = ["squeue", "--states=all", "--noheader", "--format", "\x1f".join(fields.values())]
        if name:
            cmd += ["--name", name]
        result = self.run(*cmd)
        if result.returncode != 0:
            raise RuntimeError(f"squeue failed: {result.stderr}")
        return [
            dict(zip(fields, line.split("\x1f")))
            for line in result.stdout.splitlines()
            if line.strip()
        ]

    def batch_script(self, job_id: str) -> str:
        result = self.run("scontrol", "write", "batch_script", job_id, "-")
        if result.returncode != 0:
            raise RuntimeError(f"scontrol write batch_script {job_id} failed: {result.stderr}")
        return result.stdout

    def logs(self, chars: int = 3000) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.is_file() and path != self.jobcomp:
                parts.append(f"--- {path.name}:\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    # -- tear-down -----------------------------------------------------------------------

    def stop(self, keep: bool = False):
        """Cancel what is left in the queue, stop the daemons (TERM, then KILL) and
        remove the folder (unless keep)."""
        if any(proc.poll() is None for name, proc in self._procs if name == "slurmctld"):
            try:
                self.run("scancel", "--user", "root", timeout=15)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and any(
                    j["state"] in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING")
                    for j in self.jobs()
                ):
                    time.sleep(1)
            except (subprocess.TimeoutExpired, RuntimeError):
                pass
        for _name, proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
        self._procs.clear()
        if self._linked and SYSTEM_CONF.is_symlink() and SYSTEM_CONF.readlink() == self.conf:
            SYSTEM_CONF.unlink()
        self._linked = False
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)
