"""The program a sandbox worker runs INSIDE the sandbox (passed to the interpreter with -c; it
imports nothing from the project). It reads requests from stdin, runs each one in a forked child
with resource limits in a fresh scratch folder, and writes one result per request to stdout.

Nothing carries over between executions: /scratch (and, in namespaces, /tmp and /dev/shm) is
emptied before each one, and each runs in a folder with a fresh random name, so no file an earlier
step planted can collide with it. No process outlives its execution: in namespaces every process of
the PID namespace but this worker is killed; with resource limits only, this worker is the
processes' subreaper (an orphan, even one that called setsid, becomes its child, never init's) and
kills every descendant.

Memory is one budget per execution, `memory_mb`: the proportional set size of all the execution's
processes plus what its folders hold (in namespaces each a tmpfs of `scratch_mb`: pages of memory),
checked every 50 ms; past it the execution is killed (status `memory`). Each process is also held to
what is left of the budget beside the folders by RLIMIT_AS, so one process fails its allocation
(MemoryError) before the watch has to act.

Protocol: 4-byte big-endian length + JSON, both ways. Request: {"code", "wall", "cpu", "memory_mb",
"processes", "file_mb", "output_chars", "scratch_mb"}. Result: {"status", "exit_code", "stdout", "stderr",
"seconds", "truncated"}; status is ok | error | timeout | memory | killed.
"""
import json
import os
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback

SITE = os.environ.pop("EVOFORGE_SANDBOX_SITE", "")
if SITE:
    sys.path.append(SITE)  # after the standard library: sympy and numpy for the model's code
NAMESPACED = os.environ.pop("EVOFORGE_SANDBOX_NAMESPACED", "") == "1"
SCRATCH = os.getcwd()
FOLDERS = (SCRATCH, "/tmp", "/dev/shm") if NAMESPACED else (SCRATCH,)
MEMORY_CHECK_SECONDS = 0.05
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper():
    """Without a PID namespace: orphans of the execution are re-parented to this worker, not to init."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _processes():
    """pid -> (parent pid, state) of every process this worker can see."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            table[int(name)] = (int(fields[1]), fields[0])
    return table


def execution_pids():
    """The live processes of the execution: in a PID namespace all but its init (1) and this worker; without
    one, this worker's descendants."""
    me, table = os.getpid(), _processes()
    if NAMESPACED:
        return [pid for pid, (_, state) in table.items() if pid not in (1, me) and state != "Z"]
    children = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = [], [me]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            if table[pid][1] != "Z":
                found.append(pid)
    return found


def memory_used():
    """Bytes the execution holds: its processes' proportional set size plus its folders' contents."""
    total = 0
    for pid in execution_pids():
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    if NAMESPACED:
        for folder in FOLDERS:
            stats = os.statvfs(folder)
            total += (stats.f_blocks - stats.f_bfree) * stats.f_frsize
    return total


def reap():
    """Collect the exit status of any child (an orphan re-parented to this worker included)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def read_message():
    header = sys.stdin.buffer.read(4)
    if len(header) < 4:
        return None
    (size,) = struct.unpack(">I", header)
    return json.loads(sys.stdin.buffer.read(size))


def write_message(message):
    data = json.dumps(message).encode()
    sys.stdout.buffer.write(struct.pack(">I", len(data)) + data)
    sys.stdout.buffer.flush()


def child(request, run_dir, out_w, err_w):
    os.setsid()
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.chdir(run_dir)
    mb = 1024 * 1024
    # the CPU limit's hard value is a second above the soft one: at the soft limit the kernel sends
    # SIGXCPU (read as a timeout); with both equal it sends SIGKILL, indistinguishable from any other kill
    resource.setrlimit(resource.RLIMIT_CPU, (request["cpu"], request["cpu"] + 1))
    memory_mb = request["memory_mb"] - (len(FOLDERS) * request["scratch_mb"] if NAMESPACED else 0)  # tmpfs pages too
    for limit, value in ((resource.RLIMIT_AS, memory_mb * mb), (resource.RLIMIT_NPROC, request["processes"]),
                         (resource.RLIMIT_FSIZE, request["file_mb"] * mb), (resource.RLIMIT_NOFILE, 64),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    os.environ.clear()
    # TMPDIR too: without namespaces /tmp is the host's, so tempfile must not go there
    os.environ.update({"PATH": "/usr/bin:/bin", "HOME": run_dir, "TMPDIR": run_dir, "LANG": "C.UTF-8"})
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    code = 0
    try:
        exec(compile(request["code"], "<sandbox>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    except MemoryError:
        traceback.print_exc()
        code = 3
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def sweep():
    """Kill whatever the execution left behind (a fork bomb's children, a daemon that left its process group
    and session), until none is left."""
    for _ in range(20):
        pids = execution_pids()
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.005)
        reap()
    reap()


def empty(folder):
    """Remove everything in `folder` (what an earlier execution left, including its planted files)."""
    for entry in os.scandir(folder):
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except OSError:
            pass


def run(request, number):
    for folder in FOLDERS:
        empty(folder)
    run_dir = tempfile.mkdtemp(prefix="run-", dir=SCRATCH)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(out_r)
        os.close(err_r)
        child(request, run_dir, out_w, err_w)
    os.close(out_w)
    os.close(err_w)
    limit = request["output_chars"]
    buffers = {out_r: bytearray(), err_r: bytearray()}
    truncated = False
    open_fds = [out_r, err_r]
    deadline = started + request["wall"]
    budget = request["memory_mb"] * 1024 * 1024
    timed_out = over_budget = False
    status_code = None
    checked = started
    while status_code is None:
        now = time.monotonic()
        remaining = deadline - now
        if now - checked >= MEMORY_CHECK_SECONDS:
            checked = now
            over_budget = memory_used() > budget
        if remaining <= 0 or over_budget:
            timed_out = not over_budget
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            status_code = os.waitpid(pid, 0)[1]
            break
        wait = min(remaining, MEMORY_CHECK_SECONDS)
        ready, _, _ = select.select(open_fds, [], [], wait) if open_fds else ([], [], time.sleep(0.005))
        for fd in ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.remove(fd)
                continue
            room = limit * 4 - len(buffers[fd])  # bytes; the decoded text is cut to `limit` characters below
            if room > 0:
                buffers[fd] += chunk[:room]
            truncated = truncated or len(chunk) > room
        if not ready:  # quiet: has the child ended (its leftovers may still hold the pipes open)?
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status_code = code
    sweep()
    for fd in open_fds:  # what is already in the pipes (bounded: a leftover writer must not keep us here)
        for _ in range(16):
            if not select.select([fd], [], [], 0)[0]:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            truncated = truncated or len(buffers[fd]) + len(chunk) > limit * 4
            buffers[fd] += chunk[: max(0, limit * 4 - len(buffers[fd]))]
    os.close(out_r)
    os.close(err_r)
    seconds = time.monotonic() - started
    for folder in FOLDERS:
        empty(folder)
    stdout = buffers[out_r].decode("utf-8", "replace")
    stderr = buffers[err_r].decode("utf-8", "replace")
    truncated = truncated or len(stdout) > limit or len(stderr) > limit
    if os.WIFSIGNALED(status_code):
        sig = os.WTERMSIG(status_code)
        exit_code = -sig
        status = "timeout" if timed_out or sig == signal.SIGXCPU else "killed"
    else:
        exit_code = os.WEXITSTATUS(status_code)
        status = "ok" if exit_code == 0 else ("memory" if exit_code == 3 and "MemoryError" in stderr else "error")
    if timed_out:
        status = "timeout"
    if over_budget:
        status, stderr = "memory", (stderr + f"\nsandbox: the execution's processes and files passed its memory budget "
                                           f"({request['memory_mb']} MB)")[-limit:]
    return {"status": status, "exit_code": exit_code, "stdout": stdout[:limit], "stderr": stderr[-limit:],
            "seconds": seconds, "truncated": truncated}


def main():
    number = 0
    if not NAMESPACED:
        become_subreaper()
    write_message({"ready": True, "pid": os.getpid(), "uid": os.getuid()})
    while True:
        request = read_message()
        if request is None:
            return
        number += 1
        try:
            write_message(run(request, number))
        except Exception as err:  # the worker must survive whatever the child did
            write_message({"status": "killed", "exit_code": None, "stdout": "", "stderr": f"sandbox worker: {err!r}",
                           "seconds": 0.0, "truncated": False})


if __name__ == "__main__":
    main()
