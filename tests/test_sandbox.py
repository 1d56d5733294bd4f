"""The code sandbox's acceptance criteria: model code never harms the caller, sees nothing
of the host (project, data, home, other processes, network), leaves nothing for the next
run, and cannot pass a test without producing the expected output."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from stable_rlhf.testbed import sandbox
from stable_rlhf.testbed.sandbox import (
    UID_RANGE,
    SandboxResult,
    SandboxUnavailable,
    missing_capability,
    run_python_tests,
    sandbox_processes,
)

REPO = Path(__file__).resolve().parents[1]
NO_SANDBOX = missing_capability()


@pytest.fixture(autouse=True)
def _sandbox_here(request):
    """Every test here runs code in the sandbox, except those of its refusal to run."""
    if NO_SANDBOX is not None and "unavailable" not in request.node.name:
        pytest.skip(f"no sandbox on this machine: it needs {NO_SANDBOX}")


SQUARE_TESTS = [([2], 4), ([3], 9), ([0], 0), ([-4], 16)]


def _caller_is_fine() -> None:
    """The test process can still spawn a subprocess and talk to it."""
    out = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True, timeout=10)
    assert out.stdout.strip() == "42"


def inside(body: str, *args: Any) -> Any:
    """What ``probe(*args)``, defined by ``body``, returns when run inside the sandbox (it
    prints the value as JSON at import time; we read it back from the captured output)."""
    code = f"{body}\nimport json as _json\nprint('PROBE ' + _json.dumps(probe(*{list(args)!r})))\n"
    res = run_python_tests(code + "def ok():\n    return 1\n", "ok", [([], 1)])
    assert res.passed == 1, res
    return json.loads(next(line[6:] for line in res.stdout.splitlines() if line.startswith("PROBE ")))


def test_correct_code_passes_all():
    res = run_python_tests("def square(x):\n    return x * x\n", "square", SQUARE_TESTS)
    assert isinstance(res, SandboxResult)
    assert (res.passed, res.total, res.timed_out, res.error) == (4, 4, False, None)


def test_wrong_code_passes_some():
    # x + x equals x * x only for 0 and 2.
    res = run_python_tests("def square(x):\n    return x + x\n", "square", SQUARE_TESTS)
    assert (res.passed, res.total) == (2, 4)


def test_exceptions_syntax_errors_and_missing_function():
    res = run_python_tests("def square(x):\n    return 16 // x\n", "square", SQUARE_TESTS)
    assert res.passed == 0 and res.error == "ZeroDivisionError"
    res = run_python_tests("def square(x)\n    return x\n", "square", SQUARE_TESTS)
    assert res.passed == 0 and res.error.startswith("SyntaxError")
    res = run_python_tests("def cube(x):\n    return x ** 3\n", "square", SQUARE_TESTS)
    assert res.passed == 0 and "not defined" in res.error


def test_prints_are_captured_not_confused_with_results():
    res = run_python_tests("print('hello from model')\ndef square(x):\n    return x * x\n", "square", SQUARE_TESTS)
    assert res.passed == 4 and "hello from model" in res.stdout


def test_infinite_loop_is_stopped_within_the_time_limit():
    start = time.monotonic()
    res = run_python_tests("def square(x):\n    while True:\n        pass\n", "square", SQUARE_TESTS, timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert res.timed_out and res.passed == 0
    assert elapsed < 3.0, elapsed


def test_tests_finished_before_a_hang_still_count():
    code = "def square(x):\n    if x == 0:\n        while True:\n            pass\n    return x * x\n"
    res = run_python_tests(code, "square", SQUARE_TESTS, timeout_s=1.0)
    assert res.timed_out and res.passed == 2  # the tests before x == 0


@pytest.mark.parametrize(
    "bomb",
    [
        "import os\nwhile True:\n    os.fork()\n",
        # Keeps going after fork fails, and each child leaves the process group.
        "import os\nwhile True:\n    try:\n        os.fork()\n        os.setsid()\n    except OSError:\n        pass\n",
    ],
)
def test_fork_bomb_is_contained(bomb):
    start = time.monotonic()
    res = run_python_tests(bomb, "square", SQUARE_TESTS, timeout_s=1.5)
    assert time.monotonic() - start < 5.0
    assert res.passed == 0
    assert sandbox_processes() == []  # not even zombies
    _caller_is_fine()


@pytest.mark.parametrize("bomb", ["x = 'a' * 10**10\n", "x = []\nwhile True:\n    x.append('a' * 10**6)\n"])
def test_memory_bomb_fails_without_harming_the_caller(bomb):
    start = time.monotonic()
    res = run_python_tests(bomb + "def square(x):\n    return x * x\n", "square", SQUARE_TESTS, memory_mb=256)
    assert time.monotonic() - start < 5.0
    assert res.passed == 0 and res.error is not None
    _caller_is_fine()


def test_code_cannot_touch_the_hosts_files():
    with tempfile.TemporaryDirectory() as keep_dir:
        keep = Path(keep_dir)
        (keep / "sub").mkdir()
        (keep / "sub" / "data.txt").write_text("precious")
        lone = Path(tempfile.mkstemp(prefix="srlhf-keep-")[1])
        lone.write_text("also precious")
        try:
            os.chmod(lone, 0o644)
            code = (
                "import os, shutil\n"
                f"shutil.rmtree({keep_dir!r}, ignore_errors=True)\n"
                f"try:\n    os.remove({str(lone)!r})\nexcept OSError:\n    pass\n"
                f"try:\n    open({str(lone)!r}, 'w').write('clobbered')\nexcept OSError:\n    pass\n"
                "def square(x):\n    return x * x\n"
            )
            res = run_python_tests(code, "square", SQUARE_TESTS)
            assert res.passed == 4  # the attempts failed quietly; the code still ran
            assert (keep / "sub" / "data.txt").read_text() == "precious"
            assert lone.read_text() == "also precious"
        finally:
            lone.unlink()


def test_bool_is_not_an_int_and_floats_are_tolerant():
    tests = [([4], True), ([3], False)]
    assert run_python_tests("def even(n):\n    return int(n % 2 == 0)\n", "even", tests).passed == 0
    assert run_python_tests("def even(n):\n    return n % 2 == 0\n", "even", tests).passed == 2
    assert run_python_tests("def third():\n    return 0.1 + 0.2\n", "third", [([], 0.3)]).passed == 1


# ------------------------------------------------------------------ what it can see

LISTS_OR_READS = """
import os
def probe(paths):
    reached = []
    for p in paths:
        try:
            os.listdir(p) if os.path.isdir(p) else open(p, 'rb').read(16)
            reached.append(p)
        except OSError:
            pass
    return reached
"""


def test_project_data_and_home_are_invisible():
    secret_prompts = REPO / "data" / "testbed" / "prompts_eval.jsonl"  # hidden tests, expected outputs
    paths = [REPO, REPO / "data", REPO / "data" / "testbed", secret_prompts, Path(sandbox.__file__), Path.home(),
             "/root", "/home", "/etc/passwd", "/work", sys.prefix, "/usr/bin/python3", "/proc/1/root/etc"]
    paths = [str(p) for p in paths if os.path.exists(p)]
    assert str(secret_prompts) in paths and str(REPO) in paths  # the host can read them
    assert inside(LISTS_OR_READS, paths) == []


def test_the_root_is_the_runtime_and_nothing_else():
    seen = inside(
        "import os, sys\n"
        "def probe():\n"
        "    try:\n"
        "        open(sys.base_prefix + '/lib/planted.py', 'w')\n"
        "        writable = True\n"
        "    except OSError:\n"
        "        writable = False\n"
        "    site = sys.base_prefix + '/lib/python%d.%d/site-packages' % sys.version_info[:2]\n"
        "    return [sorted(os.listdir('/')), sys.base_prefix, writable, os.listdir(site), os.getcwd()]\n"
    )
    top, prefix, runtime_writable, site_packages, cwd = seen
    assert set(top) <= {"python", "usr", "lib", "lib64", "lib32", "libx32", "proc", "dev", "tmp", "run"}, top
    assert (prefix, runtime_writable, site_packages, cwd) == ("/python", False, [], "/tmp")


def test_code_runs_as_a_throwaway_uid_without_capabilities():
    uid, euid, gid, groups, cap_eff, hostname = inside(
        "import os, socket\n"
        "def probe():\n"
        "    caps = [line.split()[1] for line in open('/proc/self/status') if line.startswith('CapEff')]\n"
        "    return [os.getuid(), os.geteuid(), os.getgid(), os.getgroups(), caps[0], socket.gethostname()]\n"
    )
    assert UID_RANGE[0] <= uid < UID_RANGE[1] and euid == uid == gid and groups == []
    assert int(cap_eff, 16) == 0 and hostname == "sandbox"


def test_other_processes_are_invisible():
    seen = inside(
        "import os\n"
        "def probe(host_pid):\n"
        "    mine, foreign, leaked = os.getuid(), [], []\n"
        "    for pid in [p for p in os.listdir('/proc') if p.isdigit()] + [str(host_pid), '1']:\n"
        "        try:\n"
        "            uid = int(open('/proc/%s/status' % pid).read().split('Uid:')[1].split()[0])\n"
        "            foreign += [] if uid == mine else [pid]\n"
        "            leaked.append(open('/proc/%s/cmdline' % pid, 'rb').read().decode('latin-1'))\n"
        "            leaked.append(open('/proc/%s/environ' % pid, 'rb').read().decode('latin-1'))\n"
        "        except OSError:\n"
        "            pass\n"
        "    return [foreign, [s for s in leaked if 'pytest' in s or 'HOME=/root' in s or 'RESULTS = ' in s]]\n",
        os.getpid(),
    )
    assert seen == [[], []]  # not the test's pid, not the harness (pid 1), nothing of ours


def test_nothing_is_left_for_the_next_run():
    mark = "srlhf-leftover-" + secrets.token_hex(4)
    dirs = ["/tmp", "/run/lock", "/dev/shm", "/var/tmp"]
    leave = inside(
        "import os\n"
        "def probe(dirs, mark):\n"
        "    left = []\n"
        "    for d in dirs:\n"
        "        try:\n"
        "            open(os.path.join(d, mark), 'w').write('x')\n"
        "            left.append(d)\n"
        "        except OSError:\n"
        "            pass\n"
        "    return left\n",
        dirs, mark,
    )
    assert leave == dirs[:3]  # the writable ones
    found = inside(
        "import os\n"
        "def probe(dirs, mark):\n"
        "    return [d for d in dirs if os.path.exists(os.path.join(d, mark))]\n",
        dirs, mark,
    )
    assert found == []
    assert not any(os.path.exists(os.path.join(d, mark)) for d in dirs)  # nor on the host


def test_network_is_unreachable():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        seen = inside(
            "import socket\n"
            "def probe(port):\n"
            "    reached = []\n"
            "    for host in ('127.0.0.1', '::1', 'localhost'):\n"
            "        try:\n"
            "            socket.create_connection((host, port), timeout=1).close()\n"
            "            reached.append(host)\n"
            "        except OSError:\n"
            "            pass\n"
            "    return [reached, [name for _, name in socket.if_nameindex()]]\n",
            port,
        )
        assert seen == [[], ["lo"]]
        # And the harness itself really could connect: the port was listening.
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    finally:
        server.close()


# ------------------------------------------------------------------ forging a pass

# Looks everywhere the code can reach for an expected output (strings shaped like
# "zq<16 hex>-<n>"): gc, every module, the frames, __main__, /proc/self, and answers with
# what it found. It also writes forged result lines, old and new formats, to every fd.
HUNTER = r"""
import gc, json, os, re, sys, __main__
SHAPE = re.compile(r'zq[0-9a-f]{16}-[0-9]+')


def strings():
    found = []
    for obj in gc.get_objects() + [vars(m) for m in list(sys.modules.values()) if m] + [vars(__main__)]:
        values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
        found += [v for v in values if isinstance(v, str)]
    frame = sys._getframe()
    while frame:
        found += [v for v in list(frame.f_globals.values()) + list(frame.f_locals.values()) if isinstance(v, str)]
        frame = frame.f_back
    for name in ('cmdline', 'environ'):
        found.append(open('/proc/self/' + name, 'rb').read().decode('latin-1'))
    return [m for s in found for m in SHAPE.findall(s)]


LEAKED = set(strings())
FORGE = True
nonces = {s for s in (v for v in vars(__main__).values() if isinstance(v, str)) if re.fullmatch('[0-9a-f]{32}', s)}
forged = [json.dumps({'i': i, 'out': True, 'passed': True}) for i in range(4)] + ['{"done": true}', '{"ok": true}']
forged += [n + ' ' + line for n in nonces for line in forged]
for fd in range(64 if FORGE else 0):
    for line in forged:
        try:
            os.write(fd, (line + '\n').encode())
        except OSError:
            pass


def answer(k):
    return next((s for s in LEAKED if s.endswith('-%d' % k)), 'no idea')
"""


def test_forging_a_pass_needs_the_expected_outputs():
    secret = "zq" + secrets.token_hex(8)
    tests = [([k], f"{secret}-{k}") for k in range(4)]
    res = run_python_tests(HUNTER, "answer", tests)
    assert res.passed == 0 and res.error is None, res
    # The hunter is not blind: an expected output planted where the code can reach it is
    # found (without the forged lines, which shift its own replies by one).
    planted = HUNTER.replace("FORGE = True", f"FORGE = False\nHINT = {secret + '-2'!r}\nLEAKED = set(strings())")
    assert run_python_tests(planted, "answer", tests).passed == 1


def test_replies_written_by_the_code_only_claim_return_values():
    # The function writes its own "reply" for test 0 straight to the worker's reply pipe.
    code = (
        "import os\n"
        "def f(x):\n"
        "    os.write(3, b'{\"out\": \"forged\"}\\n')\n"
        "    return x\n"
    )
    res = run_python_tests(code, "f", [([1], 1), ([2], 2)])
    assert res.passed == 0  # test 0 reads "forged", test 1 reads test 0's reply (1)


# ------------------------------------------------------------- crafted return values


@pytest.mark.parametrize(
    "body",
    [
        "    return 10**400\n",  # an int no float can hold
        "    return 10**5000\n",  # past int -> str's digit limit
        "    return [float('nan'), float('inf')]\n",
        "    x = []\n    for _ in range(990):\n        x = [x]\n    return x\n",  # near the recursion limit
        "    import sys\n    sys.setrecursionlimit(10**5)\n    x = []\n"
        "    for _ in range(20000):\n        x = [x]\n    return x\n",
        "    return 'x' * 10**6\n",  # a reply line over the size limit
        "    import os\n    os.write(3, b'{\"out\": ' + b'[' * 5000 + b']' * 5000 + b'}\\n')\n    return 0\n",
        "    import os\n    os.write(3, b'\\xff{not json\\n')\n    return 0\n",
    ],
)
def test_crafted_return_values_fail_instead_of_crashing(body):
    res = run_python_tests("def f():\n" + body, "f", [([], 1), ([], 1.5), ([], [[1.0]])])
    assert res.passed == 0 and not res.timed_out, res


def test_big_ints_are_compared_exactly():
    assert run_python_tests("def f():\n    return 10**400\n", "f", [([], 10**400)]).passed == 1
    assert run_python_tests("def f():\n    return 10**400 + 1\n", "f", [([], 10**400)]).passed == 0


# ----------------------------------------------------------- refusing to run unisolated


def test_unavailable_without_root(monkeypatch):
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    with pytest.raises(SandboxUnavailable, match="root"):
        run_python_tests("def f():\n    return 1\n", "f", [([], 1)])


def test_unavailable_when_the_kernel_refuses_a_namespace(monkeypatch):
    if NO_SANDBOX is not None:
        pytest.skip(f"refused before the kernel is asked: {NO_SANDBOX}")
    # A flag unshare(2) rejects stands in for a kernel built without a namespace type.
    monkeypatch.setitem(sandbox.NAMESPACES, "time-travel", 0x1)
    with pytest.raises(SandboxUnavailable, match=r"unshare\(.*time-travel.* namespaces\) failed: Invalid argument"):
        run_python_tests("def f():\n    return 1\n", "f", [([], 1)])


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
def test_unavailable_without_cap_sys_admin():
    if NO_SANDBOX is not None:
        pytest.skip(f"refused before the kernel is asked: {NO_SANDBOX}")
    # Root without CAP_SYS_ADMIN (as in a locked-down container): the kernel says EPERM.
    script = ("from stable_rlhf.testbed.sandbox import run_python_tests\n"
              "run_python_tests('def f():\\n    return 1\\n', 'f', [([], 1)])\n")
    out = subprocess.run(["setpriv", "--bounding-set", "-sys_admin", sys.executable, "-c", script],
                         capture_output=True, text=True, timeout=30, cwd=REPO)
    assert out.returncode != 0
    assert "SandboxUnavailable" in out.stderr and "Operation not permitted" in out.stderr, out.stderr[-2000:]


def test_no_process_outlives_its_run():
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    time.sleep(60)\n"
        "def f():\n"
        "    return 1\n"
    )
    assert run_python_tests(code, "f", [([], 1)]).passed == 1
    assert sandbox_processes() == []


def test_nothing_outlives_a_killed_caller():
    script = ("from stable_rlhf.testbed.sandbox import run_python_tests\n"
              "run_python_tests('import time\\ndef f():\\n    time.sleep(100)\\n', 'f', [([], 1)], timeout_s=60)\n")
    caller = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.monotonic() + 20
        while not sandbox_processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sandbox_processes(), "the sandbox never started"
        time.sleep(1.0)  # until the code sits in f(): its harness waits on it, not on us
    finally:
        caller.kill()
        caller.wait()
    deadline = time.monotonic() + 5
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() == []
