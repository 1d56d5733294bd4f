"""Run model-written Python against hidden tests, isolated from everything we own.

One call, three processes (the host is whoever calls ``run_python_tests``):

* the **waiter**, ``python -I -S`` started by the host as root: it reads the job from a
  pipe, unshares a PID namespace and forks the namespace's init, then only waits (and,
  on the host's SIGTERM, SIGKILLs that init: the kernel then kills everything inside).
  It dies with the host (``PR_SET_PDEATHSIG``), and the init with it;
* the **harness**, PID 1 of the new PID namespace, still root and still trusted: it
  unshares mount, network, IPC and UTS namespaces, builds an empty root (``build_root``
  in ``_BOOTSTRAP``), ``pivot_root``s into it and runs the tests;
* the **worker**, forked by the harness, limited (rlimits), dropped to a throw-away uid
  with no capabilities, exec'ing the base interpreter as ``/python/bin/pythonX.Y -I -S``.
  Only this process (and whatever it forks) ever runs model code.

What the model code sees:

* **files**: a fresh read-only tmpfs as ``/`` holding ``/python`` (``sys.base_prefix``,
  read-only, its site-packages masked by an empty tmpfs), the directories of the shared
  libraries it links against (read-only, at their usual paths), ``/dev/{null,zero,full,
  random,urandom}``, its own ``/proc`` and fresh tmpfs ``/tmp``, ``/run/lock`` and
  ``/dev/shm`` (gone when the run ends). No project, data, home or ``/etc``;
* **processes**: its own PID namespace, and ``/proc`` mounted ``hidepid=2``, so it sees
  its own processes only; the harness (root) is invisible;
* **network**: a new network namespace: one loopback interface, down;
* **limits**: RLIMIT_CPU, AS, FSIZE, NOFILE, NPROC (per throw-away uid, so a fork bomb in
  one sandbox cannot starve another), ``no_new_privs``. The host's wall-clock deadline
  kills the waiter's namespace; an ``alarm`` in the harness ends it too if the host dies.

The result channel: the harness sends the worker one test's arguments at a time and
reads back one line, the function's return value as the worker claims it, and forwards
that line to the host on a pipe only the waiter and harness hold. The expected outputs
never enter the sandbox: the host compares. So nothing the code can find in its own
process (``import __main__``, ``sys.modules``, ``gc.get_objects()``, frames, fds) lets it
forge a pass: the most it can do is claim return values, which is what a function does.
The worker's replies, and all it prints, are untrusted input to the host: decoded and
compared with guards (a 10**400 or a list nested 990 deep is a failed test, not a crash).

Needs root on Linux (CAP_SYS_ADMIN for the namespaces and mounts, CAP_SETUID for the
throw-away uid). Without what it needs, ``run_python_tests`` raises ``SandboxUnavailable``
naming the missing piece; there is no weaker fallback mode.

Why no ``preexec_fn``: Python documents it as unsafe when the parent has threads, and
``gold_rewards`` runs sandboxes from a thread pool. The privileged setup happens in the
waiter's and harness's own single-threaded interpreter instead.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

# Throw-away uids (and gids) for sandboxed code: no passwd entry, far above any real account.
UID_RANGE = (200_000, 260_000)

# The namespaces the harness unshares (the waiter unshares the PID one), from <sched.h>.
NAMESPACES = {"mount": 0x00020000, "UTS": 0x04000000, "IPC": 0x08000000, "network": 0x40000000}

_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}  # pivot_root(2) has no libc wrapper: syscall numbers
_RUNTIME_MOUNT = "/python"  # where sys.base_prefix appears inside the sandbox
_MAX_LINE = 256 * 1024  # a reply line longer than this is dropped (test counted failed)
_MAX_STDOUT = 8 * 1024  # output kept for SandboxResult.stdout
_MAX_CODE = 50_000  # characters of code we are willing to run


class SandboxUnavailable(RuntimeError):
    """Isolation cannot be set up on this machine; code tasks refuse to run without it."""


@dataclass
class SandboxResult:
    passed: int
    total: int
    timed_out: bool
    error: str | None
    stdout: str


# The waiter and the harness, passed with ``-c``; argv[1] is the results fd, stdin the job.
# Everything here runs as root and never executes model code.
_BOOTSTRAP = r'''
import ctypes, fcntl, json, os, resource, signal, sys, time

CLONE_NEWPID = 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH, PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 2, 1, 38
TOO_LONG = b'{"exc": "result too large"}'

libc = ctypes.CDLL(None, use_errno=True)
RESULTS = int(sys.argv[1])  # to the host; closed before the worker execs
JOB = json.loads(sys.stdin.buffer.read())


class SetupError(Exception):
    pass


def send(obj):
    data = (json.dumps(obj) + "\n").encode()
    while data:
        data = data[os.write(RESULTS, data):]


def call(what, rc):
    if rc != 0:
        raise SetupError("%s failed: %s" % (what, os.strerror(ctypes.get_errno())))


def mount(src, dst, fstype=None, flags=0, data=None):
    enc = lambda s: None if s is None else s.encode()
    rc = libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data))
    call("mount %s on %s" % (fstype or src or "(remount)", dst), rc)


def bind_readonly(src, dst):
    mount(src, dst, None, MS_BIND)
    mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def build_root(new, layout):
    """An empty tmpfs at ``new`` with the runtime read-only, a few devices, a /proc of our
    own and fresh world-writable tmpfs dirs. Mounts stay in this namespace (private)."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=512,mode=755")
    for src, dst in layout["binds"]:
        os.makedirs(new + dst)
        bind_readonly(src, new + dst)
    for dst in layout["masks"]:
        mount("tmpfs", new + dst, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=755")
    for target, link in layout["links"]:
        os.makedirs(os.path.dirname(new + link), exist_ok=True)
        os.symlink(target, new + link)
    os.mkdir(new + "/proc")
    mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
    os.mkdir(new + "/dev")
    mount("tmpfs", new + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,nr_inodes=64,mode=755")
    for name in ("null", "zero", "full", "random", "urandom"):
        open(new + "/dev/" + name, "w").close()
        mount("/dev/" + name, new + "/dev/" + name, None, MS_BIND)
    os.symlink("/proc/self/fd", new + "/dev/fd")
    for d in ("/tmp", "/run/lock", "/dev/shm"):
        os.makedirs(new + d)
        mount("tmpfs", new + d, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,nr_inodes=4096,mode=1777")


def enter_root(new):
    """pivot_root into ``new`` and detach the old root: the host's tree is gone from this
    mount namespace, not just out of sight. Then make / itself read-only."""
    os.chdir(new)
    call("pivot_root", libc.syscall(ctypes.c_long(JOB["pivot_root_nr"]), b".", b"."))
    call("umount of the old root", libc.umount2(b".", MNT_DETACH))
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def become_worker(req_r, rep_w):
    """In the forked worker: fds 0 (requests) and 3 (replies) only, besides 1 and 2 (the
    host's output pipe); limits; the throw-away uid; exec the sandbox's interpreter."""
    req, rep = fcntl.fcntl(req_r, fcntl.F_DUPFD, 10), fcntl.fcntl(rep_w, fcntl.F_DUPFD, 10)
    os.dup2(req, 0)
    os.dup2(rep, 3)
    os.closerange(4, 1 << 16)  # RESULTS among them
    for name, soft, hard in JOB["limits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    uid = JOB["uid"]
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid):
        return
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return
    os.chdir("/tmp")
    os.execve(JOB["python"], [JOB["python"], "-I", "-S", "-X", "utf8", "-c", JOB["worker"]], JOB["env"])


def start_worker():
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            become_worker(req_r, rep_w)
        finally:
            os._exit(127)
    os.close(req_r)
    os.close(rep_w)
    return pid, req_w, rep_r


def lines(fd):
    """The lines the worker writes (no newline); an over-long one becomes TOO_LONG."""
    buf, dropping = bytearray(), False
    while True:
        nl = buf.find(b"\n")
        if nl >= 0:
            line = TOO_LONG if dropping else bytes(buf[:nl])
            del buf[: nl + 1]
            dropping = False
            yield line
            continue
        if len(buf) > JOB["max_line"]:
            buf, dropping = bytearray(), True
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        buf += chunk


def put(fd, obj):
    data = (json.dumps(obj) + "\n").encode()
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:  # the worker is gone; reading its reply says so
        pass


def exit_status(pid):
    for _ in range(40):  # its reply pipe closed; it may still be on its way out
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    return None


def run_tests():
    """One request, one reply line, forwarded as an opaque string; test i's line can only
    be the reply to test i's arguments, whatever the code writes and when."""
    pid, req_w, rep_r = start_worker()
    replies = lines(rep_r)
    if next(replies, None) != b"ready":  # nothing but our own bootstrap has run so far
        raise SetupError("the sandboxed interpreter did not start (exit %s)" % exit_status(pid))
    put(req_w, {"code": JOB["code"], "func_name": JOB["func_name"]})
    for i in range(-1, len(JOB["inputs"])):
        if i >= 0:
            put(req_w, JOB["inputs"][i])
        line = next(replies, None)
        if line is None:
            send({"lost": i, "exit": exit_status(pid)})
            return
        send({"i": i, "reply": line.decode("utf-8", "replace")})
    send({"done": True})


def init():
    """PID 1 of the new PID namespace: isolate, then run the tests. When we exit, the
    kernel kills whatever the worker left behind."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the waiter died: so do we
    signal.signal(signal.SIGALRM, lambda *_: os._exit(124))  # backstop if the host is gone
    signal.alarm(JOB["alarm_s"])
    try:
        names = ", ".join(n for n, _ in JOB["namespaces"])
        flags = sum(f for _, f in JOB["namespaces"])
        call("unshare(%s namespaces)" % names, libc.unshare(flags))
        build_root("/tmp", JOB["layout"])
        enter_root("/tmp")
        libc.sethostname(b"sandbox", 7)
        run_tests()
    except (SetupError, OSError) as e:
        send({"setup": str(e)})
    os._exit(0)


def wait_for(child):
    signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGKILL))
    status = 0
    while True:
        try:
            pid, st = os.wait()
        except ChildProcessError:
            break
        if pid == child:
            status = st
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the host died: so do we (and so our init)
if os.getppid() != JOB["host_pid"]:  # it died before we asked
    os._exit(70)
try:
    call("unshare(PID namespace)", libc.unshare(CLONE_NEWPID))
except SetupError as e:
    send({"setup": str(e)})
    os._exit(70)
child = os.fork()
if child == 0:
    init()
os.close(RESULTS)
wait_for(child)
'''

# The worker, run by the sandbox's own interpreter as the throw-away uid. Nothing here is
# secret: the code can read and call all of it, and only ever claims return values.
_WORKER = r'''
import json, os, sys


def reply(obj):
    for stream in (sys.stdout, sys.stderr):  # prints reach the host before the run ends
        try:
            stream.flush()
        except BaseException:
            pass
    try:
        data = json.dumps(obj)
    except Exception:  # TypeError, ValueError (int too long, cycles), RecursionError, ...
        data = json.dumps({"exc": "unserialisable " + type(obj.get("out")).__name__})
    data = (data + "\n").encode()
    while data:
        data = data[os.write(3, data):]


def describe(e):
    try:
        return type(e).__name__ + ": " + str(e)[:200]
    except BaseException:
        return type(e).__name__


os.write(3, b"ready\n")
requests = os.fdopen(0, "rb", closefd=False)
task = json.loads(requests.readline())
ns = {"__name__": "__solution__", "__builtins__": __builtins__}
try:
    exec(compile(task["code"], "<solution>", "exec"), ns)
    fn = ns.get(task["func_name"])
    error = None if callable(fn) else "function %r is not defined" % task["func_name"]
except BaseException as e:
    error = describe(e)
reply({"error": error} if error else {"ok": True})
if error:
    os._exit(0)
for line in requests:
    try:
        out = fn(*json.loads(line))
    except BaseException as e:
        reply({"exc": type(e).__name__})
        continue
    reply({"out": out})
os._exit(0)
'''


# ------------------------------------------------------------------ what it needs


def missing_capability() -> str | None:
    """Why isolation cannot be set up here (checked before every run), or None. The
    kernel's own refusals surface later, from the harness, as ``SandboxUnavailable`` too."""
    if not sys.platform.startswith("linux"):
        return f"Linux namespaces (this is {sys.platform})"
    if os.geteuid() != 0:
        return (f"root (running as uid {os.geteuid()}): mount, PID and network namespaces need "
                "CAP_SYS_ADMIN and running the code as a throw-away uid needs CAP_SETUID; run as "
                "root or in a container")
    if os.uname().machine not in _PIVOT_ROOT:
        return f"pivot_root's syscall number on {os.uname().machine} (known: {sorted(_PIVOT_ROOT)})"
    if not os.access(_host_python(), os.X_OK):
        return f"the base interpreter {_host_python()} (sys.base_prefix/bin)"
    return None


def _python_name() -> str:
    return f"python{sys.version_info.major}.{sys.version_info.minor}"


def _host_python() -> str:
    return os.path.join(os.path.realpath(sys.base_prefix), "bin", _python_name())


@functools.lru_cache(maxsize=1)
def runtime_layout() -> dict[str, list]:
    """What the sandbox's root holds besides its own /proc, /dev and tmpfs dirs:
    ``binds`` (host dir, path inside; all read-only), ``masks`` (paths inside hidden by an
    empty tmpfs) and ``links`` (symlink target, path inside)."""
    prefix = os.path.realpath(sys.base_prefix)
    binds = [(prefix, _RUNTIME_MOUNT)] + [(d, d) for d in _library_dirs()]
    masks = [_RUNTIME_MOUNT + p[len(prefix):] for p in _site_dirs(prefix)]
    links = [(os.readlink(p), p) for p in ("/lib", "/lib32", "/libx32", "/lib64") if os.path.islink(p)]
    return {"binds": binds, "masks": masks, "links": links}


def _site_dirs(prefix: str) -> list[str]:
    lib = os.path.join(prefix, "lib", _python_name())
    return [p for p in (os.path.join(lib, "site-packages"), os.path.join(lib, "dist-packages")) if os.path.isdir(p)]


def _library_dirs() -> list[str]:
    """Real directories holding the shared libraries the interpreter links against: libc's
    (found in our own memory map), the same multiarch dir under /lib and /usr/lib, and the
    dynamic loader's /lib64 dirs. Bound at their own paths, so the loader finds them."""
    libc_dir = ""
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split(maxsplit=5)[-1].strip()
            if os.path.basename(path).startswith("libc.so"):
                libc_dir = os.path.dirname(os.path.realpath(path))
                break
    arch = os.path.basename(libc_dir)  # "x86_64-linux-gnu" on Debian; "lib64" where there is no multiarch
    multiarch = [f"/lib/{arch}", f"/usr/lib/{arch}"] if arch not in ("", "lib", "lib64", "lib32") else []
    candidates = [libc_dir, *multiarch, "/lib64", "/usr/lib64"]
    dirs: list[str] = []
    for d in candidates:
        if d and os.path.isdir(d) and not os.path.islink(d) and os.path.realpath(d) not in dirs:
            dirs.append(os.path.realpath(d))
    return dirs


# --------------------------------------------------------------------------- uids

_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()


def _claim_uid() -> int:
    rng = random.SystemRandom()
    busy = {u for _, u in _processes()}
    with _uid_lock:
        while True:
            uid = rng.randrange(*UID_RANGE)
            if uid not in _uids_in_use and uid not in busy:
                _uids_in_use.add(uid)
                return uid


def _release_uid(uid: int) -> None:
    with _uid_lock:
        _uids_in_use.discard(uid)


def _processes() -> list[tuple[int, int]]:
    """(pid, real uid) of every process we can see, read from /proc."""
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration, ValueError):  # it exited while we looked
            continue
        out.append((int(pid), uid))
    return out


def sandbox_processes() -> list[int]:
    """PIDs of every process (zombies too) owned by a sandbox uid. For tests."""
    lo, hi = UID_RANGE
    return [pid for pid, u in _processes() if lo <= u < hi]


# ------------------------------------------------------------------------ compare


def _same(got: Any, want: Any) -> bool:
    """JSON-value equality, strict on bool vs int, exact on ints, tolerant on float rounding."""
    if isinstance(want, bool) or isinstance(got, bool):
        return type(got) is type(want) and got == want
    if isinstance(want, int) and isinstance(got, int):
        return got == want
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        if isinstance(got, float) and not math.isfinite(got):
            return got == want
        return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)  # OverflowError past 1e308
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(_same, got, want))
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(
            _same(got[k], want[k]) for k in want
        )
    return type(got) is type(want) and got == want


def _passes(reply: dict, want: Any) -> bool:
    """The worker's claimed return value equals ``want``. Anything it sent that we cannot
    compare (an int too big for a float, nesting past the recursion limit) fails the test."""
    if "out" not in reply:
        return False
    try:
        return _same(reply["out"], want)
    except (OverflowError, RecursionError, MemoryError):
        return False


def _decode(raw: Any) -> dict:
    """A worker reply line, untrusted: a dict or a malformed marker, never an exception."""
    try:
        msg = json.loads(raw) if isinstance(raw, str) else None
    except (ValueError, RecursionError, MemoryError):
        msg = None
    return msg if isinstance(msg, dict) else {"exc": "malformed result"}


# --------------------------------------------------------------------------- main


def run_python_tests(
    code: str,
    func_name: str,
    tests: list[tuple[list, Any]],
    timeout_s: float = 3.0,
    memory_mb: int = 256,
    max_procs: int = 16,
) -> SandboxResult:
    """Define ``code`` in a sandbox, call ``func_name(*args)`` for each ``(args, expected)``
    and count the outputs equal to ``expected``.

    ``timeout_s`` is the wall-clock limit for the whole run (start-up included); tests that
    finished before it still count. Raises ``SandboxUnavailable`` where code cannot be
    isolated (see the module docstring), rather than run it less isolated.
    """
    # Round-trip through JSON so both sides see the same values (tuples -> lists).
    tests = json.loads(json.dumps([[list(a), e] for a, e in tests]))
    total = len(tests)
    if len(code) > _MAX_CODE:
        return SandboxResult(0, total, False, "code too long", "")
    missing = missing_capability()
    if missing is not None:
        raise SandboxUnavailable(f"the code sandbox needs {missing}")
    uid = _claim_uid()
    proc = None
    try:
        job = _job(code, func_name, [a for a, _ in tests], uid, timeout_s, memory_mb, max_procs)
        deadline = time.monotonic() + timeout_s
        proc, results_fd = _start(job)
        msgs, other, timed_out = _collect(proc, results_fd, deadline)
    finally:
        if proc is not None:
            _stop(proc, results_fd)
        _release_uid(uid)
    setup = next((str(m["setup"]) for m in msgs if "setup" in m), None)
    if setup is not None:
        raise SandboxUnavailable(f"the code sandbox cannot isolate code here: {setup}\n{other[-2000:]}")
    passed, error = _tally(msgs, tests, timed_out)
    return SandboxResult(passed, total, timed_out, error, other)


def _job(code: str, func_name: str, inputs: list, uid: int, timeout_s: float, memory_mb: int,
         max_procs: int) -> dict:
    """What the waiter reads on its stdin. No expected output is in it."""
    cpu_s = max(1, math.ceil(timeout_s)) + 1  # a backstop: the wall-clock deadline comes first
    python = f"{_RUNTIME_MOUNT}/bin/{_python_name()}"
    return {
        "code": code,
        "func_name": func_name,
        "inputs": inputs,
        "uid": uid,
        "host_pid": os.getpid(),
        # Hard limits equal soft ones (CPU: one more, to deliver SIGXCPU then SIGKILL), so
        # the code cannot raise them again.
        "limits": [
            ("RLIMIT_CPU", cpu_s, cpu_s + 1),
            ("RLIMIT_AS", memory_mb << 20, memory_mb << 20),
            ("RLIMIT_FSIZE", 1 << 20, 1 << 20),
            ("RLIMIT_NOFILE", 64, 64),
            ("RLIMIT_CORE", 0, 0),
            ("RLIMIT_NPROC", max_procs, max_procs),
        ],
        "alarm_s": max(1, math.ceil(timeout_s)) + 3,
        "namespaces": sorted(NAMESPACES.items()),
        "pivot_root_nr": _PIVOT_ROOT[os.uname().machine],
        "layout": runtime_layout(),
        "python": python,
        "env": {"PATH": f"{_RUNTIME_MOUNT}/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8",
                "LD_LIBRARY_PATH": f"{_RUNTIME_MOUNT}/lib"},  # the interpreter's RUNPATH names the host path
        "worker": _WORKER,
        "max_line": _MAX_LINE,
    }


def _start(job: dict) -> tuple[subprocess.Popen, int]:
    """Start the waiter with the job on its stdin. Returns it and the read end of the
    results pipe (the code's output comes on ``proc.stdout``)."""
    results_r, results_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [_host_python(), "-I", "-S", "-c", _BOOTSTRAP, str(results_w)],
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # setsid(): its own session and process group
            pass_fds=(results_w,),
        )
    except BaseException:
        os.close(results_r)
        raise
    finally:
        os.close(results_w)
    data = memoryview(json.dumps(job).encode())
    try:
        while data:
            data = data[os.write(proc.stdin.fileno(), data):]
    except BrokenPipeError:  # it died before reading: _collect reports no result
        pass
    finally:
        proc.stdin.close()
    return proc, results_r


def _collect(proc: subprocess.Popen, results_fd: int, deadline: float) -> tuple[list[dict], str, bool]:
    """Read the harness's messages and the code's output until the harness is done or the
    deadline. Returns the messages, the first few KB of output, and whether the deadline hit."""
    out_fd = proc.stdout.fileno()
    open_fds = [results_fd, out_fd]
    buf, other, msgs = bytearray(), bytearray(), []
    drain_until = None
    while open_fds:
        now = time.monotonic()
        if now >= deadline:
            return msgs, other.decode("utf-8", "replace"), True
        if results_fd not in open_fds:  # the harness is done: give the output a moment
            drain_until = drain_until or now + 0.2
            if now >= drain_until:
                break
        ready, _, _ = select.select(open_fds, [], [], min(0.05, deadline - now))
        for fd in ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.remove(fd)
            elif fd == out_fd:
                other += chunk[: max(0, _MAX_STDOUT - len(other))]  # the rest is read and dropped
            else:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                msgs += [json.loads(line) for line in lines]  # the harness's own JSON
                buf = bytearray(buf)
    return msgs, other.decode("utf-8", "replace"), False


def _tally(msgs: list[dict], tests: list[list], timed_out: bool) -> tuple[int, str | None]:
    """Tests passed and the error to report, from the harness's messages."""
    replies = {m["i"]: _decode(m["reply"]) for m in msgs if "i" in m}
    load = replies.pop(-1, {})
    passed = sum(_passes(r, tests[i][1]) for i, r in replies.items())
    error = load.get("error") or next((r["exc"] for r in replies.values() if "exc" in r), None)
    error = None if error is None else str(error)[:300]
    lost = next((m for m in msgs if "lost" in m), None)
    if timed_out:
        error = error or "timeout"
    elif error is None and lost is not None:
        error = f"no result (exit code {lost['exit']})"
    elif error is None and not any(m.get("done") for m in msgs):
        error = "no result"
    return passed, error


def _stop(proc: subprocess.Popen, results_fd: int) -> None:
    """Leave nothing running. SIGTERM asks the waiter to SIGKILL the namespace's init, and
    the kernel then kills everything in the namespace; a SIGKILLed waiter takes the init
    with it (PR_SET_PDEATHSIG)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    proc.stdout.close()
    os.close(results_fd)
