"""Two "hosts" on one machine: two network namespaces joined by a veth pair, as by a cable.

Each namespace is a network stack of its own (its own `lo`, 127.0.0.1 and ports); the veth ends
get addresses that exist only inside the two namespaces, so nothing is configured in the host's
namespace and no traffic can leave the machine. Needs root and iproute2 (`ip`; `tc` to shape).

Names carry the creating process's pid ("gdt<pid>x<n>a"/"...b", at most 15 characters, the limit
for interface names), so `sweep()` can remove what a killed run left behind without touching
namespaces of a run that is still alive.
"""
import atexit
import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import time

PREFIX = "gdt"
NAME = re.compile(rf"^{PREFIX}(\d+)x(\d+)[ab]$")
ADDRS = ("10.47.0.1", "10.47.0.2")  # exist only inside the two namespaces
_counter = itertools.count()
_open = []


class NetnsError(RuntimeError):
    pass


def ip(*args, check=True, timeout=30):
    """Run `ip ARGS`; on failure raise NetnsError with ip's one-line complaint."""
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        said = (r.stderr or r.stdout).strip().splitlines()
        raise NetnsError(f"ip {' '.join(args)}: {said[-1] if said else f'exit {r.returncode}'}")
    return r


class Link:
    """Namespaces ns[0], ns[1]; in each, a veth end named like its namespace, with addr[i]/24."""

    def __init__(self):
        base = f"{PREFIX}{os.getpid()}x{next(_counter)}"
        self.ns = (base + "a", base + "b")
        assert all(len(n) <= 15 for n in self.ns), self.ns
        self.ifname = self.ns  # the veth end inside each namespace
        self.addr = ADDRS
        self.closed = False
        _cleanup_on_sigterm()
        _open.append(self)
        try:
            for ns in self.ns:
                ip("netns", "add", ns)
            # Both ends are created directly inside the namespaces: never in the host's.
            ip("link", "add", self.ifname[0], "netns", self.ns[0], "type", "veth",
               "peer", "name", self.ifname[1], "netns", self.ns[1])
            for ns, dev, addr in zip(self.ns, self.ifname, self.addr):
                ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                ip("-n", ns, "link", "set", "lo", "up")
                ip("-n", ns, "link", "set", dev, "up")
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def cmd(self, node, argv):
        """argv run inside node's namespace (`ip netns exec` execs it: the pid stays the same)."""
        return ["ip", "netns", "exec", self.ns[node], *map(str, argv)]

    def set_up(self, node, up):
        """Bring node's end of the cable up or down (down: the cable is cut, nothing is sent)."""
        ip("-n", self.ns[node], "link", "set", self.ifname[node], "up" if up else "down")

    def shape(self, rate_bit, hz=100):
        """Limit both directions to rate_bit bits/s with a token bucket (tbf shapes what an
        interface sends, so both ends get one). Its burst must be at least rate/HZ bytes (hz:
        the kernel's timer rate; 100, the lowest, is safe) and 64 KB (a GSO packet)."""
        burst = max(64 * 1024, int(rate_bit / 8 / hz))
        for ns, dev in zip(self.ns, self.ifname):
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root",
                            "tbf", "rate", f"{int(rate_bit)}bit", "burst", str(burst),
                            "latency", "100ms"], check=True, capture_output=True, timeout=30)

    def unshape(self):
        for ns, dev in zip(self.ns, self.ifname):
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"],
                           capture_output=True, timeout=30)

    def pids(self, node):
        return pids_in(self.ns[node])

    def kill(self, node):
        """SIGKILL every process in node's namespace (a whole node lost); returns their pids."""
        return kill_in(self.ns[node])

    def close(self):
        """Kill what runs inside, delete the link and the namespaces. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        remove(self.ns)
        with contextlib.suppress(ValueError):
            _open.remove(self)


def pids_in(ns):
    r = ip("netns", "pids", ns, check=False)
    return [int(p) for p in r.stdout.split()]


def kill_in(ns):
    """SIGKILL the processes in a namespace until none is left (a dying parent may fork)."""
    killed = []
    deadline = time.time() + 10
    while time.time() < deadline:
        pids = pids_in(ns)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        time.sleep(0.05)
    return killed


def remove(names):
    """Kill the processes of each namespace first (else it lives on while they hold it), then
    delete the veth pair (deleting one end deletes both) and the namespaces."""
    existing = set(list_namespaces())
    for ns in names:
        if ns in existing:
            kill_in(ns)
    for ns in names:
        if ns in existing:
            ip("-n", ns, "link", "del", ns, check=False)
            ip("netns", "del", ns, check=False)


def list_namespaces():
    r = ip("netns", "list", check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def sweep():
    """Remove namespaces that an earlier run, now dead, left behind (after a SIGKILL, say).
    Returns their names."""
    stale = [ns for ns in list_namespaces()
             if (m := NAME.match(ns)) and not os.path.exists(f"/proc/{m.group(1)}")]
    remove(stale)
    return stale


@atexit.register
def close_all():
    for link in list(_open):
        link.close()


def _on_sigterm(signum, frame):
    close_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)  # then die of it, as without this handler


def _cleanup_on_sigterm():
    """A SIGTERM (a scheduler's, a CI runner's) ends a process without running atexit handlers:
    remove the namespaces first, then die of the signal as before. (After a SIGKILL the next
    sweep() removes them.)"""
    with contextlib.suppress(ValueError):  # not in the main thread: leave signals alone
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)


def why_not(shaping=False):
    """None where two namespaces can be joined here (and, with shaping, tbf works on the link);
    else one line saying why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (ip netns add); this runs as a normal user"
    needed = ["ip", "tc"] if shaping else ["ip"]
    missing = [c for c in needed if shutil.which(c) is None]
    if missing:
        return f"no `{missing[0]}` command here (install iproute2)"
    try:
        sweep()
        with Link() as link:
            # ip netns exec also needs to remount /sys, which some containers forbid
            subprocess.run(link.cmd(0, ["true"]), check=True, capture_output=True, timeout=30)
            if shaping:
                link.shape(100e6)
    except (NetnsError, subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as e:
        detail = getattr(e, "stderr", None) or str(e)
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        detail = " ".join(str(detail).split())
        what = "shape a veth link with tbf" if shaping else "create network namespaces"
        return f"cannot {what}: {detail}"
    return None


def require(reason):
    """In a test: skip with one line where namespaces cannot be made (reason from why_not()); under
    CI (CI=true) that is a failure instead, so the suite cannot silently stop covering two hosts."""
    import pytest
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)
