"""The run lock on S3 (data/lease.py): a lease object taken and renewed with conditional writes, on
the local S3 server (moto). Holders on "other machines" are subprocesses with their own EVOFORGE_HOME.
A ttl of 2 s keeps each test to a few seconds."""
from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

pytestmark = pytest.mark.server

TTL = 2.0

# a holder on another machine: takes the run's lock, says so, waits for a line on stdin, then checks
# its lease (what the lake does just before a commit) and leaves the lock
HOLDER = """
import sys
from evoforge.data.lease import LeaseLost
from evoforge.data.runlock import RunBusy, check_run_lease, run_lock
uri, what = sys.argv[1], sys.argv[2]
try:
    with run_lock(uri, what):
        print("held", flush=True)
        sys.stdin.readline()
        try:
            check_run_lease(uri)
            print("checked", flush=True)
        except LeaseLost as err:
            print(f"LeaseLost: {err}", flush=True)
except RunBusy as err:
    print(f"RunBusy: {err}", flush=True)
    sys.exit(3)
print("released", flush=True)
"""


class Machine:
    """A python process of its own (its own EVOFORGE_HOME) running HOLDER; its output lines in a queue."""

    def __init__(self, home, uri: str, what: str = "round 0 / verify"):
        home.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, uri, what], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "EVOFORGE_HOME": str(home), "EVOFORGE_MACHINE_ID": home.name})
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line.rstrip("\n")) for line in self.proc.stdout],
                         daemon=True).start()

    def line(self, timeout: float = 20) -> str:
        return self.lines.get(timeout=timeout)

    def go_on(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture()
def lease_run(local_s3, monkeypatch) -> str:
    """A run folder on a fresh bucket of the local S3 server; the AWS variables and a short ttl for this
    process and the processes it starts."""
    for key, value in local_s3.environment().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("EVOFORGE_LOCK_TTL_SECONDS", str(TTL))
    bucket = local_s3.create_bucket(f"lease-{uuid.uuid4().hex[:12]}")
    return f"s3://{bucket}/runs/r1"


def read_lease(local_s3, uri: str) -> dict | None:
    bucket, key = uri[len("s3://"):].split("/", 1)
    try:
        return json.loads(local_s3.client().get_object(Bucket=bucket, Key=f"{key}/_lock.json")["Body"].read())
    except local_s3.client().exceptions.NoSuchKey:
        return None


def take_when_free(uri: str, what: str, deadline_s: float):
    """Poll run_lock until it is granted; returns (the open context, seconds waited)."""
    from evoforge.data.runlock import RunBusy, run_lock

    start = time.monotonic()
    while True:
        lock = run_lock(uri, what)
        try:
            lock.__enter__()
            return lock, time.monotonic() - start
        except RunBusy:
            if time.monotonic() - start > deadline_s:
                raise
            time.sleep(0.2)


def test_a_second_machine_is_refused_with_who_holds_the_run(lease_run, local_s3, scratch):
    first = Machine(scratch / "machine-a", lease_run)
    try:
        assert first.line() == "held"
        since = read_lease(local_s3, lease_run)["since"]
        second = Machine(scratch / "machine-b", lease_run, "round 0 / generate")
        try:
            refusal = second.line()
            assert second.proc.wait(20) == 3
        finally:
            second.stop()
        assert refusal.startswith(f"RunBusy: run 'r1' is busy: round 0 / verify (pid {first.proc.pid} on "
                                  f"{socket.gethostname()}, since {since}, lease renewed ")
        assert refusal.endswith(f"wait for it to finish or stop that process (lock: {lease_run}/_lock.json)")
        first.go_on()
        assert [first.line(), first.line()] == ["checked", "released"]
        assert read_lease(local_s3, lease_run) is None  # released: the object is gone
    finally:
        first.stop()
    second = Machine(scratch / "machine-b", lease_run, "round 0 / generate")
    try:
        assert second.line() == "held"
    finally:
        second.stop()


def test_a_killed_holder_frees_the_run_when_its_lease_expires(lease_run, local_s3, scratch):
    from evoforge.data.runlock import RunBusy, run_lock

    first = Machine(scratch / "machine-a", lease_run)
    try:
        assert first.line() == "held"
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        with pytest.raises(RunBusy, match=rf"round 0 / verify \(pid {first.proc.pid} on "):
            with run_lock(lease_run, "round 0 / generate"):  # before the ttl: still refused
                pass
        lock, waited = take_when_free(lease_run, "round 0 / generate", deadline_s=TTL + TTL / 3 + 6)
    finally:
        first.stop()
    try:
        # its last renewal was at most ttl/3 before the kill, and the lease lives a whole ttl after it
        assert waited >= TTL - TTL / 3 - 0.3
        lease = read_lease(local_s3, lease_run)
        assert lease["pid"] == os.getpid() and lease["what"] == "round 0 / generate"
        assert f"pid {first.proc.pid} on" in lease["took_over"]
    finally:
        lock.__exit__(None, None, None)
    assert read_lease(local_s3, lease_run) is None


def test_a_holder_killed_on_this_machine_frees_the_run_at_once(lease_run, local_s3, scratch, monkeypatch):
    """kill -9 then the same command again, on the same machine: its pid is gone, so no ttl to wait."""
    from evoforge.data.runlock import run_lock

    first = Machine(scratch / "machine-a", lease_run)
    try:
        assert first.line() == "held"
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
    finally:
        first.stop()
    monkeypatch.setenv("EVOFORGE_MACHINE_ID", "machine-a")  # the same machine as the killed holder
    started = time.monotonic()
    with run_lock(lease_run, "round 0 / generate"):
        assert time.monotonic() - started < TTL / 2
        assert f"pid {first.proc.pid} on" in read_lease(local_s3, lease_run)["took_over"]


def test_a_paused_holder_whose_lease_was_taken_over_cannot_commit_nor_delete_it(lease_run, local_s3, scratch):
    first = Machine(scratch / "machine-a", lease_run)
    try:
        assert first.line() == "held"
        first.proc.send_signal(signal.SIGSTOP)  # paused past its ttl: no heartbeat
        lock, _ = take_when_free(lease_run, "round 0 / generate", deadline_s=TTL + TTL / 3 + 6)
        try:
            ours = read_lease(local_s3, lease_run)
            first.proc.send_signal(signal.SIGCONT)
            first.go_on()  # resumed, it is about to commit
            lost = first.line()
            assert lost.startswith("LeaseLost: lost the lock of run 'r1' (round 0 / verify, held since ")
            assert f"it is now held by round 0 / generate (pid {os.getpid()} on " in lost and "\n" not in lost
            assert first.line() == "released" and first.proc.wait(10) == 0
            assert read_lease(local_s3, lease_run)["holder"] == ours["holder"]  # its release left ours alone
        finally:
            lock.__exit__(None, None, None)
    finally:
        first.proc.send_signal(signal.SIGCONT) if first.proc.poll() is None else None
        first.stop()
    assert read_lease(local_s3, lease_run) is None


def test_the_lease_is_reentrant_per_thread_refused_to_other_threads_and_gone_on_exit(lease_run, local_s3):
    from evoforge.data.runlock import RunBusy, check_run_lease, run_lock

    class Uri:  # the lake's S3 run folder: only its str() is an s3:// URI
        def __str__(self):
            return lease_run

    refused = []

    def other_thread():
        try:
            with run_lock(lease_run, "round 0 / verify"):
                pass
        except RunBusy as err:
            refused.append(str(err))

    with run_lock(Uri(), "round 0"):
        with run_lock(lease_run, "round 0 / verify"):  # re-entrant for its own thread
            assert read_lease(local_s3, lease_run)["what"] == "round 0"
            check_run_lease(lease_run)
            check_run_lease(f"{lease_run}/round=0/verify")  # a folder inside the run: the same lease
            thread = threading.Thread(target=other_thread)
            thread.start()
            thread.join(20)
        assert read_lease(local_s3, lease_run) is not None  # the outer one still holds it
        time.sleep(TTL)  # renewed by its heartbeat meanwhile: still live
        with pytest.raises(RunBusy):
            from evoforge.data.lease import S3Lease

            S3Lease(lease_run, "round 0 / generate").acquire()
    assert refused and "another thread of this process" in refused[0] and "\n" not in refused[0]
    assert read_lease(local_s3, lease_run) is None
    check_run_lease(lease_run)  # none held: a no-op
    check_run_lease("/some/local/run")  # a local run: a no-op
    with run_lock(lease_run, "round 0 / verify"):  # free again
        pass


def test_of_two_takers_of_an_expired_lease_only_one_wins(lease_run, local_s3):
    from evoforge.data.lease import S3Lease
    from evoforge.data.runlock import RunBusy

    dead = S3Lease(lease_run, "round 0 / verify", ttl=1).acquire()
    dead._stop.set()  # a holder that stopped renewing
    time.sleep(2.5)
    takers = [S3Lease(lease_run, "round 0 / generate") for _ in range(4)]
    for taker in takers:
        taker.client  # noqa: B018 - made before the race
    results, start = [], threading.Barrier(len(takers))

    def take(lease):
        start.wait()
        try:
            results.append(lease.acquire())
        except RunBusy as err:
            results.append(err)

    threads = [threading.Thread(target=take, args=(t,)) for t in takers]
    [t.start() for t in threads]
    [t.join(20) for t in threads]
    winners = [r for r in results if isinstance(r, S3Lease)]
    assert len(results) == 4 and len(winners) == 1
    assert read_lease(local_s3, lease_run)["holder"] == winners[0].holder
    dead.release()  # taken over: leaves the winner's lease alone
    assert read_lease(local_s3, lease_run)["holder"] == winners[0].holder
    winners[0].release()
    assert read_lease(local_s3, lease_run) is None


def test_a_missing_bucket_is_one_clear_line(lease_run):
    from evoforge.data.runlock import LockUnavailable, run_lock

    bucket = f"lease-missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(LockUnavailable) as err:
        with run_lock(f"s3://{bucket}/runs/r1", "round 0 / verify"):
            pass
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"cannot lock run 'r1' in S3 bucket {bucket!r}: NoSuchBucket")
    with pytest.raises(LockUnavailable):  # the refusal left nothing held in this process: the same answer again
        with run_lock(f"s3://{bucket}/runs/r1", "round 0 / verify"):
            pass
