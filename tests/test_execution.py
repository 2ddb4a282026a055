"""The code sandbox and HumanEval: the 164 reference solutions pass, wrong ones fail, and each attack
is contained (scored a failure, no side effect outside, the run goes on, no process left behind).

Each attack program asserts that its attack worked, so "failed" means it was stopped; where the attack
is harmless outside the sandbox (reading, writing tmp_path, connecting to our own loopback server), a
control runs the same program unsandboxed and shows it would have worked."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanochat_jax import execution
from nanochat_jax.config import UserError
from nanochat_jax.execution import run_many, run_program
from nanochat_jax.tasks.humaneval import HumanEval, _passed, build_program, extract_code

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
LIBC = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"


def _pids_with_parent(ppid):
    pids = []
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == ppid:  # field 4, after the command's ")"
            pids.append(int(entry))
    return pids


@pytest.fixture
def leftovers():
    """A check for processes a test's sandboxes left: children of this process that were not there
    before the test (zombies included), and anything still running the sandbox's child command line,
    after a short grace for processes SIGKILLed a moment ago to finish dying."""
    before = set(_pids_with_parent(os.getpid()))

    def check():
        for _ in range(20):
            left = set(_pids_with_parent(os.getpid())) - before
            for entry in filter(str.isdigit, os.listdir("/proc")):
                try:
                    if b"nanochat_sandbox_" in Path(f"/proc/{entry}/cmdline").read_bytes():
                        left.add(int(entry))
                except OSError:
                    pass
            if not left:
                return left
            time.sleep(0.1)
        return left
    return check


@pytest.fixture(scope="module")
def humaneval():
    return HumanEval()


@pytest.fixture(scope="module")
def isolation():
    return run_program("pass").isolation


@pytest.fixture
def server():
    srv = socket.create_server(("127.0.0.1", 0))
    srv.setblocking(False)
    yield srv
    srv.close()


def _connected(srv) -> bool:
    try:
        srv.accept()[0].close()
        return True
    except BlockingIOError:
        return False


def _unsandboxed(code, cwd):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, timeout=30).returncode == 0


# ------------------------------------------------------------------------------------------- HumanEval

def test_humaneval_problems(humaneval):
    assert len(humaneval) == 164
    conv = humaneval[0]
    assert conv["humaneval"]["task_id"] == "HumanEval/0"
    user, assistant = conv["messages"]
    assert user["role"] == "user" and assistant["role"] == "assistant"
    assert assistant["content"].startswith(user["content"]) and len(assistant["content"]) > len(user["content"])
    assert len(HumanEval(limit=5)) == 5 and HumanEval(limit=5)[4]["humaneval"]["task_id"] == "HumanEval/4"
    with pytest.raises(UserError):
        HumanEval(split="train")


def test_all_canonical_solutions_pass(humaneval, leftovers):
    convs = list(humaneval)
    # the reference conversations' own replies, bare and as a fenced block after some prose
    replies = [c["messages"][1]["content"] for c in convs]
    replies[1::2] = [f"Here it is:\n```python\n{r}```\nDone." for r in replies[1::2]]
    assert humaneval.score_many(convs, replies, workers=2) == [True] * 164
    assert not leftovers()


def test_wrong_and_early_exiting_solutions_fail(humaneval):
    conv = humaneval[2]  # truncate_number(number) -> number % 1.0
    prompt = conv["humaneval"]["prompt"]
    good = prompt + "    return number % 1.0\n"
    assert humaneval.score(conv, good)
    wrong = [
        prompt + "    return number\n",
        "```python\n" + prompt + "    return 0.0\n```",
        "I cannot write this function.",
        "```python\ndef something_else():\n    return 1\n```",
        good + "exit(0)\n",  # stopping before the tests run is not passing them
        good + "import sys\nsys.exit(0)\n",
        good + "import os\nos._exit(0)\n",
        good + "quit()\n",
    ]
    assert humaneval.score_many([conv] * len(wrong), wrong) == [False] * len(wrong)


def test_program_layout():
    conv = HumanEval(limit=1)[0]
    program = build_program(conv, "text\n```py\nX = 1\n```\n```python\nY = 2\n```")
    assert program.startswith("from typing import List\n\nX = 1\n")
    assert "Y = 2" not in program and program.rstrip().endswith("check(has_close_elements)")
    assert extract_code("```python\nunterminated = 1\n") == "unterminated = 1\n"
    assert extract_code("no fence at all") == "no fence at all"


# --------------------------------------------------------------------------------------------- sandbox

def test_attacks_are_contained(tmp_path, server, isolation, leftovers):
    escaped, marker = tmp_path / "escaped.txt", tmp_path / "marker"
    in_repo = REPO / "sandbox_escaped.txt"
    port = server.getsockname()[1]
    attacks = {
        "fork bomb": "import os\nwhile True:\n    os.fork()\n",
        "infinite loop": "while True:\n    pass\n",
        "10 GB": "x = bytearray(10 * 2**30)\nx[-1] = 1\n",
        "write tmp_path": f"open({str(escaped)!r}, 'w').write('x')\n",
        "write repo": f"open({str(in_repo)!r}, 'w').write('x')\n",
        "os.system": f"import os\nassert os.system('touch {marker}') == 0\n",
        "subprocess": f"import subprocess\nsubprocess.run(['touch', {str(marker)!r}], check=True)\n",
        "read README": f"assert 'nanochat' in open({str(README)!r}).read()\n",
        "socket": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n",
    }
    if "nproc" in isolation:  # NPROC = 0 counts threads too; with no OS limit threads are allowed
        attacks["threads"] = "import threading\nt = threading.Thread(target=print)\nt.start()\nt.join()\n"
    for name in ("write tmp_path", "read README", "socket"):  # controls: these work unsandboxed
        assert _unsandboxed(attacks[name], tmp_path), name
    assert escaped.exists() and _connected(server)
    escaped.unlink()

    results = run_many(list(attacks.values()) + ["print('still running')"], workers=2, timeout=1.5)
    for name, r in zip(attacks, results):
        assert not r.passed and r.status in ("failed", "timeout"), (name, r)
    by_name = dict(zip(attacks, results))
    assert by_name["infinite loop"].status == "timeout" and by_name["infinite loop"].seconds < 5
    assert "MemoryError" in by_name["10 GB"].stderr
    assert results[-1].passed and results[-1].stdout == "still running\n"
    assert not escaped.exists() and not in_repo.exists() and not marker.exists() and not _connected(server)
    assert not leftovers()
    assert all(r.isolation == isolation for r in results)


def test_os_enforced_limits(tmp_path, isolation, leftovers):
    """The same attacks through libc (ctypes), past every Python-level patch: only the kernel stops these."""
    if os.getuid() == 0:
        assert "nobody" in isolation or "jail" not in isolation  # in a jail, root always drops to nobody
    if "nproc" not in isolation:
        pytest.skip(f"this host gave the sandbox no OS process limit (isolation={isolation}): the sandbox "
                    "is root and could not drop to nobody, so only the Python-level fork patches apply")
    escaped = tmp_path / "escaped.txt"
    programs = {
        # a bounded bomb (8 processes at most) in case the limit fails
        "fork": LIBC + "for _ in range(3):\n    assert libc.fork() != -1\n",
        "setrlimit back": "import resource\nresource.setrlimit(resource.RLIMIT_NPROC, (100, 100))\n",
        "setuid 0": LIBC + "assert libc.setuid(0) == 0\n",
    }
    if "jail" in isolation:
        programs["read README"] = LIBC + f"assert libc.open({str(README).encode()!r}, 0) >= 0\n"
        programs["write tmp_path"] = LIBC + f"assert libc.open({str(escaped).encode()!r}, 0o101, 0o644) >= 0\n"
        programs["mount"] = LIBC + "assert libc.mount(b'none', b'/sandbox', b'tmpfs', 0, None) == 0\n"
    results = run_many(list(programs.values()), workers=2)
    for name, r in zip(programs, results):
        assert r.status == "failed", (name, r)
    assert not escaped.exists() and not leftovers()


def test_python_level_layer_alone(tmp_path, server, leftovers):
    """isolate=False (a host without namespaces): the patched functions still refuse."""
    escaped, marker = tmp_path / "escaped.txt", tmp_path / "marker"
    port = server.getsockname()[1]
    attacks = [
        "import os\nos.fork()\n",
        "import posix\nposix.fork()\n",
        f"import os\nassert os.system('touch {marker}') == 0\n",
        f"import subprocess\nsubprocess.run(['touch', {str(marker)!r}], check=True)\n",
        "import pty\npty.fork()\n",
        f"open({str(escaped)!r}, 'w').write('x')\n",
        f"import os\nos.open({str(escaped)!r}, os.O_WRONLY | os.O_CREAT)\n",
        f"open({str(README)!r}).read()\n",
        f"import pathlib\npathlib.Path({str(README)!r}).read_text()\n",
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n",
        "import os\nos.kill(os.getpid(), 9)\n",
        "import os, shutil\nos.makedirs('d/e')\nshutil.rmtree('d')\n",
    ]
    results = run_many(attacks + ["open('mine.txt', 'w').write('ok')\nprint(open('mine.txt').read())"],
                       workers=2, isolate=False)
    for code, r in zip(attacks, results):
        assert r.status == "failed", (code, r)
        assert "disabled in the sandbox" in r.stderr or "outside the sandbox" in r.stderr, (code, r)
    assert results[-1].passed and results[-1].stdout == "ok\n"
    assert not escaped.exists() and not marker.exists() and not _connected(server)
    assert not leftovers()


def test_timeout_kills_the_whole_group(leftovers):
    """Where fork is possible (the fallback as root), a forked sleeper dies with its group: at the wall
    limit (no CPU is used, so only the wall kill can end it), and when its parent ends first."""
    fork = LIBC + "import time\nprint(libc.fork(), flush=True)\n"
    for isolate in (True, False):
        r = run_program(fork + "time.sleep(20)\n", timeout=1.0, isolate=isolate)
        assert r.status == "timeout" and r.seconds < 3, r
        assert not leftovers(), (isolate, r)
        r = run_program(fork + "if libc.fork() == 0:\n    time.sleep(20)\n", timeout=5.0, isolate=isolate)
        assert r.status in ("passed", "failed") and r.seconds < 3, r
        assert not leftovers(), (isolate, r)


def test_output_is_capped():
    r = run_program("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))\n")
    assert r.status == "failed" and "File too large" in r.stderr
    assert len(r.stdout) <= execution.TAIL_CHARS


def test_humaneval_scoring_speaks_up_about_the_host():
    """A sandbox that could not start is the host's fault (raised, not scored wrong); one without a jail
    is said once per call site (warned)."""
    with pytest.raises(RuntimeError, match="could not be set up"):
        _passed(execution.Result("error", "", "OSError: mount: Operation not permitted", (), 0.0))
    with pytest.warns(RuntimeWarning, match="no namespaces"):
        assert _passed(execution.Result("passed", "", "", ("nproc",), 0.0))
