"""Run model-written Python against hidden tests, never in our own process.

Every call starts a fresh ``python -I -S`` child in a throw-away scratch directory and
streams one result line per test back to us. What contains it:

* **time**: a wall-clock deadline enforced here (we SIGKILL the sandbox), plus
  RLIMIT_CPU inside as a backstop;
* **memory / files / processes**: RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_NPROC;
* **identity** (when we are root, as on our machines and in CI): the child drops to a
  throw-away uid/gid with no passwd entry, so it cannot touch files it does not own,
  and RLIMIT_NPROC (which root ignores) really caps a fork bomb. After the run every
  process of that uid is SIGKILLed until none is left;
* **network**: a new, empty network namespace (root); otherwise, an unprivileged user
  namespace; otherwise a ``socket``-disabling preamble (weak, see ``_RUNNER``);
* **stray processes**: the code runs as PID 1 of a new PID namespace (as root; else
  inside a user namespace where the kernel allows one), so when it dies the kernel
  kills and reaps everything it spawned. (Our machines' init never reaps orphans;
  without this a fork bomb leaves zombies behind.)

Unprivileged (no root), the code runs as our own uid: rlimits, the namespaces and the
process-group kill still apply, but nothing stops it from deleting files we own. Run
untrusted code as root (it then drops to a throw-away uid) or in a container.

Why no ``preexec_fn``: Python documents it as unsafe when the parent has threads (the
child can deadlock before ``exec``), and ``gold_rewards`` runs sandboxes from a thread
pool. So the parent only asks for a new session (``start_new_session``, done in C) and
the privileged setup (unshare, rlimits, setuid) happens in the child's own trusted
bootstrap, single-threaded, before a byte of model code is even read.

Forged results: the child tags its result lines with a random nonce, so ordinary
prints are never read as results. Code in the same interpreter could still dig the
nonce out of memory, so the real guard is that the child reports the *values* the
function returned, not pass/fail: we compare them with the expected outputs here, and
those never enter the child. A forged line cannot pass without the right answers.
"""

from __future__ import annotations

import json
import math
import os
import random
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

# Throw-away uids (and gids) for sandboxed code when we are root: no passwd entry,
# far above any real account.
UID_RANGE = (200_000, 260_000)

_MAX_LINE = 256 * 1024  # a result line longer than this is dropped (test counted failed)
_MAX_STDOUT = 8 * 1024  # non-result output kept for SandboxResult.stdout
_MAX_CODE = 50_000  # characters of code we are willing to run


@dataclass
class SandboxResult:
    passed: int
    total: int
    timed_out: bool
    error: str | None
    stdout: str


# The child's bootstrap, passed with ``-c``. argv[1] is the payload file. Steps 1-5 run
# as root (when we are root) and never touch model code; step 6 onwards runs as the
# throw-away uid inside the new namespaces.
_RUNNER = r'''
import ctypes, json, os, resource, sys

# 1. Read the payload, then delete it (it is the only copy of the nonce on disk).
path = sys.argv[1]
with open(path) as f:
    P = json.load(f)
os.unlink(path)
nonce = P.pop("nonce")
res_fd = os.dup(1)  # results go here; model code may close or redirect fd 1


def emit(obj):
    line = nonce + " " + json.dumps(obj) + "\n"
    os.write(res_fd, line.encode("utf-8", "replace"))


def finish():
    # os._exit skips atexit hooks the model code may have registered, but also the
    # final flush: do that by hand so its prints reach SandboxResult.stdout.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(0)


# 2. Modules model code may import, loaded now: after setuid the standard library may
# be unreadable (ours lives under /root, mode 0700).
for _m in ("math cmath itertools functools collections collections.abc re string heapq "
           "bisect typing random statistics operator copy fractions decimal datetime time "
           "array dataclasses enum textwrap unicodedata numbers traceback socket encodings.idna "
           "shutil pathlib io glob").split():
    try:
        __import__(_m)
    except Exception:
        pass

# 3. Namespaces. CLONE_NEWNET gives an empty network namespace (loopback down, no
# routes); CLONE_NEWPID makes our next child PID 1 of a new PID namespace, so that when
# it dies the kernel kills and reaps all it spawned. Unprivileged: try a user namespace.
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
libc = ctypes.CDLL(None, use_errno=True)


def linux(name, *args):  # -1 where the call does not exist (not Linux)
    fn = getattr(libc, name, None)
    return fn(*args) if fn is not None else -1


root = os.geteuid() == 0
flags = CLONE_NEWNET | CLONE_NEWPID if root else CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID
isolated_net = linux("unshare", flags) == 0 or linux("unshare", CLONE_NEWUSER | CLONE_NEWNET) == 0

# 4. We stay outside as a trusted waiter and reaper: mark ourselves a child subreaper
# so orphans of the model code come back to us (not to an init that never reaps).
PR_SET_CHILD_SUBREAPER = 36
linux("prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
child = os.fork()
if child:
    import signal

    def stop_child(*_):  # our parent's polite stop: kill the tree from the top, then reap
        try:
            os.kill(child, signal.SIGKILL)
        except OSError:
            pass

    signal.signal(signal.SIGTERM, stop_child)
    status = 0
    while True:
        try:
            pid, st = os.wait()
        except ChildProcessError:
            break
        if pid == child:
            status = st
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)

# 5. Limits, then drop privileges. Hard limits equal soft ones so model code cannot
# raise them again; RLIMIT_NPROC only binds once we are not root.
L = P["limits"]
def cap(res, soft, hard=None):
    try:
        resource.setrlimit(res, (soft, soft if hard is None else hard))
    except (ValueError, OSError):
        pass
cap(resource.RLIMIT_CPU, L["cpu_s"], L["cpu_s"] + 1)
cap(resource.RLIMIT_AS, L["memory_bytes"])
cap(resource.RLIMIT_FSIZE, L["fsize_bytes"])
cap(resource.RLIMIT_NOFILE, 64)
cap(resource.RLIMIT_CORE, 0)
cap(resource.RLIMIT_NPROC, L["nproc"])
if root:
    uid = P["uid"]
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid:
        os._exit(97)

# 6. Fallback when no namespace could be had: take sockets away. This is weak: code
# can still reach the network through ctypes syscalls or a subprocess (curl, ...).
# It only stops the obvious ``socket.create_connection`` path.
if not isolated_net:
    import socket
    def _no_network(*a, **k):
        raise OSError("network disabled in sandbox")
    for _n in ("socket", "create_connection", "socketpair", "fromfd", "getaddrinfo"):
        setattr(socket, _n, _no_network)
    sys.modules["_socket"] = None

# 7. Run the model code, then call the function once per test, streaming each result
# line so a later test that hangs does not lose the earlier ones.
del P["limits"], path
try:
    code = compile(P["code"], "<solution>", "exec")
    ns = {"__name__": "__solution__", "__builtins__": __builtins__}
    exec(code, ns)
except BaseException as e:
    emit({"error": type(e).__name__ + ": " + str(e)[:200]})
    finish()
fn = ns.get(P["func_name"])
if not callable(fn):
    emit({"error": "function %r is not defined" % P["func_name"]})
    finish()
for i, args in enumerate(P["inputs"]):
    try:
        out = fn(*args)
    except BaseException as e:
        emit({"i": i, "exc": type(e).__name__})
        continue
    try:
        emit({"i": i, "out": out})
    except (TypeError, ValueError, OverflowError):
        emit({"i": i, "exc": "unserialisable " + type(out).__name__})
emit({"done": True})
finish()
'''


# --------------------------------------------------------------------------- uids

_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()


def _claim_uid() -> int:
    rng = random.SystemRandom()
    busy = _live_uids()
    with _uid_lock:
        while True:
            uid = rng.randrange(*UID_RANGE)
            if uid not in _uids_in_use and uid not in busy:
                _uids_in_use.add(uid)
                return uid


def _release_uid(uid: int) -> None:
    with _uid_lock:
        _uids_in_use.discard(uid)


def _processes() -> list[tuple[int, int, str]]:
    """(pid, real uid, state letter) of every process, read from /proc."""
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:  # no /proc: nothing we can scan
        return []
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                text = f.read()
        except OSError:  # it exited while we looked
            continue
        uid, state = -1, "?"
        for line in text.splitlines():
            if line.startswith("Uid:"):
                uid = int(line.split()[1])
            elif line.startswith("State:"):
                state = line.split()[1]
        out.append((int(pid), uid, state))
    return out


def _pids_of_uid(uid: int, include_zombies: bool = True) -> list[int]:
    return [pid for pid, u, state in _processes() if u == uid and (include_zombies or state != "Z")]


def _live_uids() -> set[int]:
    return {u for _, u, _ in _processes()}


def sandbox_processes() -> list[int]:
    """PIDs of every process (zombies too) owned by a sandbox uid. For tests."""
    lo, hi = UID_RANGE
    return [pid for pid, u, _ in _processes() if lo <= u < hi]


def _kill_uid(uid: int, budget_s: float = 5.0) -> None:
    """SIGKILL every live process of ``uid`` until none is left (a fork bomb refills
    its slots while we kill, hence the loop). Zombies cannot be killed; our reaper
    in the child collects them."""
    end = time.monotonic() + budget_s
    while time.monotonic() < end:
        pids = _pids_of_uid(uid, include_zombies=False)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.005)


def _count_own_processes() -> int:
    return len(_pids_of_uid(os.getuid()))


def _remove_files_of(uid: int) -> None:
    """Delete what the sandbox uid left in world-writable places outside its scratch
    dir. Only top-level entries owned by that uid, and never following a symlink."""
    for base in {tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"}:
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            path = os.path.join(base, name)
            try:
                st = os.lstat(path)
                if st.st_uid != uid:
                    continue
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)
            except OSError:
                pass


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


def _passes(msg: dict, want: Any) -> bool:
    """The child's reported output equals ``want``. An output we cannot compare (an int too
    big for a float, nesting past our recursion limit) fails the test instead of raising."""
    if "out" not in msg:
        return False
    try:
        return _same(msg["out"], want)
    except (OverflowError, RecursionError, MemoryError):
        return False


# --------------------------------------------------------------------------- main


def run_python_tests(
    code: str,
    func_name: str,
    tests: list[tuple[list, Any]],
    timeout_s: float = 3.0,
    memory_mb: int = 256,
    max_procs: int = 16,
) -> SandboxResult:
    """Define ``code`` in a sandboxed child, call ``func_name(*args)`` for each
    ``(args, expected)`` and count the outputs equal to ``expected``.

    ``timeout_s`` is the wall-clock limit for the whole child (start-up included);
    tests that finished before it still count.
    """
    # Round-trip through JSON so both sides see the same values (tuples -> lists).
    tests = json.loads(json.dumps([[list(a), e] for a, e in tests]))
    total = len(tests)
    if len(code) > _MAX_CODE:
        return SandboxResult(0, total, False, "code too long", "")
    nonce = secrets.token_hex(16)
    is_root = os.geteuid() == 0
    uid = _claim_uid() if is_root else None
    scratch = tempfile.mkdtemp(prefix="srlhf-sandbox-")
    proc = None
    try:
        payload = {
            "nonce": nonce,
            "code": code,
            "func_name": func_name,
            "inputs": [a for a, _ in tests],
            "uid": uid,
            "limits": _limits(timeout_s, memory_mb, max_procs, is_root),
        }
        payload_path = _write_payload(scratch, payload, uid)
        deadline = time.monotonic() + timeout_s
        proc = _start_child(scratch, payload_path)
        lines, other, timed_out = _collect(proc, deadline, nonce)
    finally:
        if proc is not None:
            _stop(proc, uid)
        shutil.rmtree(scratch, ignore_errors=True)
        if uid is not None:
            _remove_files_of(uid)
            _release_uid(uid)
    passed, error = _tally(lines, tests, timed_out, proc.returncode)
    return SandboxResult(passed, total, timed_out, error, other)


def _limits(timeout_s: float, memory_mb: int, max_procs: int, is_root: bool) -> dict[str, int]:
    """The rlimits the child's bootstrap sets before it drops privileges."""
    return {
        "cpu_s": max(1, math.ceil(timeout_s)),
        "memory_bytes": memory_mb * 1024 * 1024,
        "fsize_bytes": 1024 * 1024,
        # Root: a fresh uid owns nothing yet. Otherwise the cap counts every
        # process we already own, so leave room for those.
        "nproc": max_procs if is_root else _count_own_processes() + max_procs,
    }


def _write_payload(scratch: str, payload: dict, uid: int | None) -> str:
    """Write the payload into ``scratch`` (ours alone, 0600) and hand ``scratch`` to the sandbox uid."""
    payload_path = os.path.join(scratch, "payload.json")
    fd = os.open(payload_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f)
    if uid is not None:
        os.chown(scratch, uid, uid)  # the payload file stays root's and 0600
    os.chmod(scratch, 0o700)
    return payload_path


def _start_child(scratch: str, payload_path: str) -> subprocess.Popen:
    """The bootstrap in a fresh, isolated interpreter with a minimal environment, stdout and
    stderr merged into one pipe."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": scratch,
        "TMPDIR": scratch,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
    }
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _RUNNER, payload_path],
        cwd=scratch,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # setsid(): its own session and process group
        close_fds=True,
    )


def _tally(lines: list[dict], tests: list[list], timed_out: bool, returncode: int | None) -> tuple[int, str | None]:
    """Tests passed and the error to report, from the child's result lines."""
    # The real runner emits one line per test index; keep the first (a forged line
    # would need the right output anyway, and never counts twice).
    by_index: dict[int, dict] = {}
    error = None
    for msg in lines:
        i = msg.get("i")
        if isinstance(i, int) and 0 <= i < len(tests):
            by_index.setdefault(i, msg)
        elif "error" in msg and error is None:
            error = str(msg["error"])
    passed = sum(_passes(m, tests[i][1]) for i, m in by_index.items())
    if error is None:
        error = next((str(m["exc"]) for m in by_index.values() if "exc" in m), None)
    if timed_out:
        error = error or "timeout"
    elif not any(m.get("done") for m in lines) and error is None:
        error = f"no result (exit code {returncode})"
    return passed, error


def _collect(proc: subprocess.Popen, deadline: float, nonce: str) -> tuple[list[dict], str, bool]:
    """Read the child's output until EOF or the deadline. Returns the parsed nonce
    lines, the first few KB of everything else, and whether the deadline hit."""
    fd = proc.stdout.fileno()
    tag = (nonce + " ").encode()
    buf, other, lines = b"", bytearray(), []
    skipping = False  # inside an over-long line: drop bytes until the next newline
    exited_at = None
    while True:
        now = time.monotonic()
        if now >= deadline:
            return lines, other.decode("utf-8", "replace"), True
        # The child is done but something it spawned still holds the pipe open:
        # give it a moment, then stop waiting (the cleanup kills it).
        if proc.poll() is not None:
            exited_at = exited_at or now
            if now - exited_at > 0.2:
                break
        ready, _, _ = select.select([fd], [], [], min(0.05, deadline - now))
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[:nl], buf[nl + 1 :]
            if skipping:
                skipping = False
            elif line.startswith(tag):
                try:
                    msg = json.loads(line[len(tag) :])
                except (ValueError, RecursionError, MemoryError):  # nested past our recursion limit
                    msg = {}  # a test without a result: failed
                if isinstance(msg, dict):
                    lines.append(msg)
            elif len(other) < _MAX_STDOUT:
                other += line[: _MAX_STDOUT - len(other)] + b"\n"
        if len(buf) > _MAX_LINE:
            buf, skipping = b"", True
    return lines, other.decode("utf-8", "replace"), False


def _stop(proc: subprocess.Popen, uid: int | None) -> None:
    """Leave nothing running. Order matters: the model code must die while our
    trusted waiter is still alive to reap it (killed together, the code's process is
    orphaned to an init that never reaps and stays a zombie). As root, kill the
    sandbox uid; otherwise SIGTERM the waiter, which SIGKILLs its child. Then the
    whole process group, then reap the waiter itself."""
    if uid is not None:
        _kill_uid(uid)
    elif proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        pass
    # Unprivileged, or the waiter is stuck: kill the whole group. (Once the waiter is
    # reaped its pid cannot be reused as a group id while group members remain.)
    if proc.returncode is None or uid is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()
    if uid is not None:
        _kill_uid(uid)  # anything that escaped between the two sweeps
    proc.stdout.close()
