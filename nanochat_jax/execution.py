"""The code sandbox (STAGES.md §6): run an untrusted Python program, report whether it ran to its end.

`run_program(code)` runs `code` in a fresh interpreter (this file run as a script) in a fresh temp dir
that is deleted afterwards; `run_many(programs)` runs many on a bounded thread pool. The child process:

  1. leads its own session / process group, which the parent kills whole (SIGKILL) at the wall limit,
     and again once the leader has exited, before reaping it;
  2. where the OS lets it (root, or unprivileged user namespaces), enters new mount and network
     namespaces and chroots into a jail that holds only read-only binds of the system and interpreter
     directories and its own work dir: the project's files, the rest of /tmp, /home, /proc and /dev
     are not there, and the network has only a loopback that is down;
  3. sets rlimits: address space, CPU seconds, file size, open files, and NPROC = 0;
  4. if it is root, becomes uid/gid 65534 (nobody), because RLIMIT_NPROC does not bind root:
     as nobody, with NPROC = 0, the kernel refuses every fork/clone, threads included;
  5. sets no_new_privs, then disables in Python the functions that start processes, signal others,
     or delete/rename/chmod files (os, posix, _posixsubprocess: subprocess, shutil, pty and
     multiprocessing all go through these), plus open() outside the work dir and socket() when
     step 2 was not possible.
Step 5 is the only layer a program can undo (ctypes reaches libc directly); 1-4 are the kernel's.
`Result.isolation` lists what held for that run ("jail", "netns", "nobody", "nproc").

A program passes when it runs to its end: an exception, exit()/sys.exit() or os._exit() before the
end is a failure. The child proves it got to the end by writing a token, received on stdin, to a
result file that is outside the jail; a program that goes looking for the token in the runner's
frames can forge a pass (as in the reference: the sandbox contains damage, it does not grade against
programs written to fool it).
"""
from __future__ import annotations

import ctypes
import os
import resource
import select
import signal
import sys

# The child runs this file as a script: modules only the parent needs are imported in its functions.

NOBODY = 65534  # uid/gid a root parent's children run as
TAIL_CHARS = 4000  # of stdout and stderr kept in a Result
FILE_LIMIT = 16 << 20  # bytes: RLIMIT_FSIZE (caps the program's output and the files it writes)
OPEN_FILES = 64
WORK = "/sandbox"  # the program's working dir, as seen inside the jail
SETUP_ERROR = 125  # the runner's exit code when the sandbox could not be set up

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
MS_KEEP = 8 | 1024 | 2048  # noexec, noatime, nodiratime (statvfs's bits are mount's): kept on the read-only remount
PR_SET_NO_NEW_PRIVS = 38

_DISABLED = (  # os / posix functions a program may not call
    "fork forkpty system popen execl execle execlp execlpe execv execve execvp execvpe spawnl spawnle spawnlp "
    "spawnlpe spawnv spawnve spawnvp spawnvpe posix_spawn posix_spawnp kill killpg setuid setgid setreuid "
    "setregid setresuid setresgid setgroups remove unlink rmdir removedirs rename renames replace truncate "
    "chmod fchmod lchmod chown fchown lchown chflags lchflags chroot fchdir putenv unsetenv mkfifo mknod setsid "
    "setpgid setpgrp"
).split()


class Result:
    """How one program ended. status: "passed" (ran to its end), "failed" (raised, or exited early),
    "timeout" (wall or CPU limit), "killed" (another signal, e.g. SIGXFSZ past the file-size limit),
    "error" (the sandbox itself could not be set up)."""

    def __init__(self, status: str, stdout: str, stderr: str, isolation: tuple, seconds: float):
        self.status, self.stdout, self.stderr = status, stdout, stderr
        self.isolation, self.seconds = isolation, seconds

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def __repr__(self):
        return (f"Result(status={self.status!r}, isolation={self.isolation}, seconds={self.seconds:.2f}, "
                f"stdout={self.stdout[-200:]!r}, stderr={self.stderr[-200:]!r})")


# ---------------------------------------------------------------------------------------------- parent

def run_program(code: str, timeout: float = 5.0, memory_mb: int = 256, isolate: bool = True) -> Result:
    """Run `code` in the sandbox; at most `timeout` seconds of wall time, `memory_mb` of address space.
    isolate=False skips step 2 (namespaces and jail), as on a host that forbids them: for tests."""
    import secrets
    import shutil
    import subprocess
    import tempfile
    import time

    if not hasattr(os, "pidfd_open"):
        raise RuntimeError("the code sandbox needs Linux (5.3 or later)")
    start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="nanochat_sandbox_")
    proc = None
    try:
        work = os.path.join(tmp, "jail" + WORK)
        os.makedirs(work)
        for path in (tmp, os.path.dirname(work)):
            os.chmod(path, 0o755)  # nobody must reach the work dir; the jail's root is ours, read-only to it
        if os.getuid() == 0:
            os.chown(work, NOBODY, NOBODY)
        with open(os.path.join(work, "program.py"), "w") as f:
            f.write(code)
        token = secrets.token_hex(16)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
        with open(os.path.join(tmp, "stdout"), "wb") as out, open(os.path.join(tmp, "stderr"), "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), tmp, str(timeout), str(memory_mb),
                 str(int(isolate))],
                stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=work, env=env, start_new_session=True)
        try:
            proc.stdin.write(token.encode())
            proc.stdin.close()
        except BrokenPipeError:  # it died before reading: its exit status tells why
            pass
        timed_out = not _wait_exit(proc.pid, timeout)
        _kill_group(proc.pid)  # the whole group, while the leader (exited or not) still holds its id
        returncode = proc.wait()
        proc = None
        report = _tail(os.path.join(tmp, "result"))  # "isolation\n" once set up, then "\ntoken\n" at the end
    finally:
        if proc is not None:  # interrupted: leave nothing running
            _kill_group(proc.pid)
            proc.wait()
        stdout, stderr = _tail(os.path.join(tmp, "stdout")), _tail(os.path.join(tmp, "stderr"))
        _remove_tree(tmp, shutil)
    isolation, set_up, rest = report.partition("\n")
    isolation = tuple(x for x in isolation.split(",") if x)
    if timed_out or returncode == -signal.SIGXCPU:
        status = "timeout"
    elif returncode == 0 and token in rest.split():
        status = "passed"
    elif returncode == SETUP_ERROR and not set_up:
        status = "error"
    elif returncode < 0:
        status = "killed"
        stderr += f"\n[sandbox] killed by {signal.Signals(-returncode).name}"
    else:
        status = "failed"
    return Result(status, stdout, stderr, isolation, time.perf_counter() - start)


def run_many(programs, workers: int | None = None, timeout: float = 5.0, memory_mb: int = 256,
             isolate: bool = True) -> list[Result]:
    """run_program over `programs` on `workers` threads (default: the CPU count); results in order."""
    from concurrent.futures import ThreadPoolExecutor

    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda code: run_program(code, timeout, memory_mb, isolate), programs))


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait until the child exits, without reaping it (its pid keeps naming our group): True if in time."""
    fd = os.pidfd_open(pid)
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _kill_group(pgid: int):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - TAIL_CHARS))
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _remove_tree(tmp: str, shutil):
    # The child's bind mounts live only in its own mount namespace, gone with it; never delete through one.
    jail = os.path.join(tmp, "jail")
    for src in _jail_binds():
        if os.path.ismount(jail + src):
            raise RuntimeError(f"sandbox: {jail + src} is still mounted; not deleting {tmp}")
    shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- child

def _child_main(tmp: str, timeout: float, memory_mb: int, isolate: bool):
    import _posixsubprocess  # noqa: F401 (patched later; loaded now, before the address-space limit)
    os.umask(0o022)
    token = sys.stdin.buffer.read()
    os.close(0)
    os.open(os.devnull, os.O_RDONLY)  # fd 0 again: input() sees end of file
    work = os.path.join(tmp, "jail" + WORK)
    with open(os.path.join(work, "program.py")) as f:
        source = f.read()
    result_fd = os.open(os.path.join(tmp, "result"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        isolation = _isolate(tmp) if isolate else []
        _set_limits(timeout, memory_mb)
        isolation += _drop_root(jailed="jail" in isolation)
        os.environ.update(HOME=os.getcwd(), TMPDIR=os.getcwd())
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        _disable_escapes(jailed="jail" in isolation, netns="netns" in isolation)
    except Exception:
        sys.excepthook(*sys.exc_info())
        os._exit(SETUP_ERROR)
    os.write(result_fd, (",".join(isolation) + "\n").encode())
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        sys.stdout.flush()
    except BaseException:  # SystemExit too: a program must run to its end to pass
        try:
            sys.excepthook(*sys.exc_info())
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(1)
    os.write(result_fd, b"\n" + token + b"\n")
    os._exit(0)


def _isolate(tmp: str) -> list:
    """New mount + network namespaces and a chroot jail, if this process may create them; [] if not."""
    libc = ctypes.CDLL(None, use_errno=True)
    # Root gets no user namespace: in one it would stay uid 0 to the kernel (no NPROC limit, and allowed
    # to signal every root process) and could not become nobody; it goes without a jail instead.
    tries = [CLONE_NEWNS | CLONE_NEWNET] + ([CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET] if os.getuid() else [])
    if not any(libc.unshare(flags) == 0 for flags in tries):
        return []
    jail = os.path.join(tmp, "jail")

    def mount(src, dst, flags):
        if libc.mount(src, dst.encode(), None, flags, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount {src} {dst}: {os.strerror(err)}")

    mount(None, "/", MS_REC | MS_PRIVATE)  # first: nothing below may propagate to the parent's namespace
    for src in _jail_binds():
        dst = jail + src
        if os.path.islink(src):  # /lib -> usr/lib on merged-/usr systems: the same link in the jail
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(os.readlink(src), dst)
            continue
        os.makedirs(dst, mode=0o755, exist_ok=True)
        mount(src.encode(), dst, MS_BIND | MS_REC)
        keep = os.statvfs(dst).f_flag & MS_KEEP
        mount(None, dst, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | keep)
    os.chroot(jail)
    os.chdir(WORK)
    return ["jail", "netns"]


def _jail_binds() -> list:
    """System dirs the interpreter and its shared libraries need, and the interpreter's own prefix."""
    paths = [p for p in ("/bin", "/lib", "/lib32", "/lib64", "/libx32", "/usr") if os.path.lexists(p)]
    prefix = os.path.realpath(sys.base_prefix)
    if not any(prefix == p or prefix.startswith(p + "/") for p in paths):
        paths.append(prefix)
    return paths


def _set_limits(timeout: float, memory_mb: int):
    cpu = int(timeout) + 1
    for limit, value in ((resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_CPU, (cpu, cpu + 1)),
                         (resource.RLIMIT_FSIZE, FILE_LIMIT), (resource.RLIMIT_NOFILE, OPEN_FILES),
                         (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, value if isinstance(value, tuple) else (value, value))


def _drop_root(jailed: bool) -> list:
    """As root, become nobody so that NPROC = 0 binds; as anyone else it binds already."""
    if os.getuid() != 0:
        return ["nproc"]
    if not jailed and not _world_readable(os.path.dirname(os.__file__)):
        return []  # nobody could not import the standard library: stay root (no OS fork limit)
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)
    return ["nobody", "nproc"]


def _world_readable(path: str) -> bool:
    while True:
        if os.stat(path).st_mode & 0o005 != 0o005:
            return False
        if path == "/":
            return True
        path = os.path.dirname(path)


def _refuse(name):
    def refused(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")
    return refused


def _disable_escapes(jailed: bool, netns: bool):
    import _posixsubprocess
    import builtins
    import io
    import posix

    for name in _DISABLED:
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, _refuse(f"os.{name}"))
    _posixsubprocess.fork_exec = _refuse("subprocess")

    def exit(code=None):  # -S leaves these out; a program calling them fails like any early exit
        raise SystemExit(code)
    builtins.exit = builtins.quit = exit

    if not jailed:  # no chroot: at least Python's open() stays inside the work dir
        here, real_open, real_os_open = os.getcwd(), io.open, os.open

        def inside(path):
            if isinstance(path, int):
                return path
            full = os.path.realpath(os.fsdecode(path))
            if full != here and not full.startswith(here + os.sep):
                raise PermissionError(f"{path}: outside the sandbox's directory")
            return path

        builtins.open = io.open = lambda file, *a, **k: real_open(inside(file), *a, **k)
        os.open = posix.open = lambda path, *a, **k: real_os_open(inside(path), *a, **k)
    if not netns:
        import _socket
        import socket
        socket.socket = _socket.socket = _refuse("socket")
        socket.socketpair = socket.create_connection = _refuse("socket")


if __name__ == "__main__":
    _child_main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1")
