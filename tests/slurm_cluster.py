"""A real one-node Slurm cluster inside a temporary directory, for the Slurm tests.

Debian's ``slurm-wlm`` and ``munge`` (``make test`` installs them when run as root). munged runs
with its own key, socket and pid file; slurmctld and slurmd listen on free loopback ports and read
a ``slurm.conf`` written here (one node of 2 CPUs, no cgroups, short KillWait). Every daemon runs
in the foreground as our child, so it is stopped by its process id; each is also told by the
kernel to end with the test process (PR_SET_PDEATHSIG), so a killed test run leaves no daemon.
At teardown the jobs are cancelled first, and any of their processes still alive (found by this
cluster's SLURM_CONF in their environment) are killed by pid.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
START_TIMEOUT_S = 30.0
NODE = socket.gethostname()  # the node's name resolves, as the rendezvous host must


def missing() -> str | None:
    """Why a cluster cannot be started here (None when it can)."""
    if os.geteuid() != 0:
        return "the test cluster runs its daemons as root (SlurmUser=root)"
    tools = [*DAEMONS, "mungekey", "sbatch", "srun", "scontrol", "scancel", "squeue"]
    absent = [t for t in tools if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]
    if absent:
        return f"missing {', '.join(absent)}: install the Debian packages slurm-wlm and munge (make test does)"
    return None


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    """In the daemon, before exec: SIGTERM when the process that started it dies."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    # ---- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        t0 = time.monotonic()
        r = self.root
        for sub in ("munge", "state", "spool", "log"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key, sock = r / "munge" / "munge.key", r / "munge" / "munge.socket"
        subprocess.run([_exe("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        os.chmod(key, 0o400)
        self._spawn("munged", [_exe("munged"), "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
                               f"--pid-file={r / 'munge' / 'munged.pid'}", f"--seed-file={r / 'munge' / 'seed'}",
                               f"--log-file={r / 'log' / 'munged.log'}"])
        self._wait(lambda: sock.exists(), "munged socket", t0)
        ctld_port, slurmd_port = _free_ports(2)
        conf = r / "slurm.conf"
        conf.write_text(self._conf(ctld_port, slurmd_port, sock))
        self.env = dict(os.environ, SLURM_CONF=str(conf))
        self._spawn("slurmctld", [_exe("slurmctld"), "-D", "-i", "-f", str(conf)])
        self._spawn("slurmd", [_exe("slurmd"), "-D", "-f", str(conf)])
        self._wait(self._node_idle, "the node to be idle", t0)

    def stop(self) -> None:
        """Cancel every job, SIGTERM each daemon we started (by pid), SIGKILL what is left after 5 s;
        then any job process still alive."""
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None and self.env:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True, timeout=10)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and subprocess.run(
                        ["squeue", "-h", "-t", "RUNNING,COMPLETING"], env=self.env, capture_output=True,
                        text=True, timeout=10).stdout.strip():
                    time.sleep(0.2)
        for name in reversed(DAEMONS):  # slurmd, slurmctld, then munged (they talk through it to the end)
            proc = self.procs.get(name)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        """Processes of this cluster's jobs still alive: their environment names our slurm.conf."""
        marker = f"SLURM_CONF={self.root / 'slurm.conf'}".encode() + b"\0"
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if marker in (entry / "environ").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 (kept open for the daemon's life)
        env = dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"))
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        log.close()

    def _wait(self, ready, what: str, t0: float) -> None:
        while time.monotonic() - t0 < START_TIMEOUT_S:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}: {self.log(name)[-1500:]}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {START_TIMEOUT_S:.0f} s waiting for {what}; "
                           f"slurmctld: {self.log('slurmctld')[-800:]} slurmd: {self.log('slurmd')[-800:]}")

    def _node_idle(self) -> bool:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
        return done.returncode == 0 and done.stdout.strip() == "idle"

    def log(self, name: str) -> str:
        texts = []
        for path in (self.root / "log" / f"{name}.log", self.root / "log" / f"{name}.out"):
            if path.exists():
                texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)

    def _conf(self, ctld_port: int, slurmd_port: int, munge_socket: Path) -> str:
        r = self.root
        host = socket.gethostname()
        return f"""\
ClusterName=largebatch
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=5
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=300
MessageTimeout=10
SlurmctldTimeout=30
SlurmdTimeout=30
JobRequeue=1
OverTimeLimit=0
NodeName={NODE} NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=test Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""

    # ---- using it -----------------------------------------------------------------------------

    def run(self, *cmd: str, env: dict[str, str] | None = None, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(list(cmd), env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()[-1500:]}")
        return done

    def job_field(self, job_id: str, key: str) -> str:
        """One field of ``scontrol show job`` (e.g. JobState, Restarts, ExitCode)."""
        text = self.run("scontrol", "-o", "show", "job", job_id).stdout
        for item in text.split():
            if item.startswith(f"{key}="):
                return item.split("=", 1)[1]
        raise KeyError(f"{key} not in: {text[:500]}")

    def wait_state(self, job_id: str, states: set[str], timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s (wanted {sorted(states)}); "
                                   f"slurmctld: {self.log('slurmctld')[-1500:]}")
            time.sleep(0.2)
