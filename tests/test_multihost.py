"""Two hosts made of network namespaces (veth, addresses of our own) rendezvous with torchrun's c10d
backend and train; the result equals the single-host run. Killing one host makes the other stop
cleanly instead of hanging. Needs root and iproute2 (CI runs as root)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support.checkpoints import final_weights
from support.runs import TINY_DATA, cli_args, cli_env, run_process, tiny_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"),
]

SUBNET = "10.231.{}.{}"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def hosts():
    """Two namespaces joined by a veth pair: (name, interface, address) for each host."""
    tag = os.getpid() % 200
    names = [f"lbA{tag}", f"lbB{tag}"]
    ifaces = [f"vA{tag}", f"vB{tag}"]
    addrs = [SUBNET.format(tag, 1), SUBNET.format(tag, 2)]
    try:
        for name in names:
            _ip("netns", "add", name)
        _ip("link", "add", ifaces[0], "type", "veth", "peer", "name", ifaces[1])
        for name, iface, addr in zip(names, ifaces, addrs, strict=True):
            _ip("link", "set", iface, "netns", name)
            _ip("-n", name, "addr", "add", f"{addr}/24", "dev", iface)
            _ip("-n", name, "link", "set", iface, "up")
            _ip("-n", name, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as err:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        pytest.skip(f"network namespaces are not available here: {err.stderr.decode().strip()}")
    yield list(zip(names, ifaces, addrs, strict=True))
    for name in names:
        kill_host(name)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def kill_host(name: str) -> None:
    """SIGKILL every process in the namespace: the host is gone, as far as its peers can tell."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def train_args(out: Path, **overrides) -> list[str]:
    """The tiny run, with a 20 s collective timeout so that a lost host is noticed quickly."""
    return cli_args(tiny_config(out, dist_timeout_s=20.0, **overrides))


def launch_on(host: tuple[str, str, str], endpoint: str, args: list[str], run_id: str, store: bool) -> subprocess.Popen:
    """torchrun on one host; the first host holds the rendezvous store (is_host), the other joins it."""
    name, iface, addr = host
    cmd = ["ip", "netns", "exec", name, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
           "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
           "--rdzv-conf", f"is_host={int(store)}", "--local-addr", addr, "--max-restarts", "0",
           "-m", "largebatch.cli", *args]
    env = cli_env(GLOO_SOCKET_IFNAME=iface)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def test_two_hosts_train_like_one_host_and_a_lost_host_stops_the_other(tmp_path, hosts):
    single = tmp_path / "single"
    done = run_process(train_args(single), torchrun=True)
    assert done.returncode == 0, done.stderr[-2000:]

    endpoint = f"{hosts[0][2]}:29411"
    multi = tmp_path / "multi"
    procs = [launch_on(host, endpoint, train_args(multi), "same", store=i == 0) for i, host in enumerate(hosts)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    a, b = final_weights(single), final_weights(multi)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # a long run; host B disappears (SIGKILL of its whole process group) in the middle
    long = tmp_path / "long"
    args = train_args(long, **{"data.options": dict(TINY_DATA, num_train=512 * 2000), "epochs": 1, "log_every": 1,
                               "checkpoint_every": 100_000})
    procs = [launch_on(host, endpoint, args, "kill", store=i == 0) for i, host in enumerate(hosts)]
    metrics = long / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.2)
    assert all(p.poll() is None for p in procs), "the run ended before a host could be lost"
    kill_host(hosts[1][0])
    t_kill = time.time()
    _, err = procs[0].communicate(timeout=180)
    waited = time.time() - t_kill
    assert procs[0].returncode != 0
    assert waited < 20 + 60, f"host A took {waited:.0f} s to give up"
    print(err[-3000:])
    assert "lost contact with another process" in err
