"""The run lock on object storage: a lease at `s3://<bucket>/<prefix>/<run>/_lock.json`.

S3 has no flock and several machines work on the same runs, so a run's lock there is a lease
object written with S3 conditional requests (no other service needed):

- take: `put_object(IfNoneMatch="*")` creates it; of two takers exactly one succeeds.
- renew: the holder's daemon heartbeat rewrites it every ttl/3 with `IfMatch=<the etag it last
  wrote>`; every body carries a fresh sequence number, so every write has a new etag.
- expire: a holder that dies (SIGKILL, machine lost) stops renewing; once the object is older than
  the holder's ttl, a taker overwrites it with `IfMatch=<the expired object's etag>`: a
  compare-and-swap, so of two takers (or a taker and a holder renewing late) only one wins.
- release: `delete_object(IfMatch=<own etag>)`: a holder whose lease was taken over never deletes
  the new holder's lease.
- fencing: a holder that was paused past its ttl (SIGSTOP, a frozen VM, a long GC) may have lost the
  lease without knowing. `check()` (and `check_run_lease(run_dir)`, which the lake calls just before
  every commit) renews the lease synchronously with `IfMatch` and raises `LeaseLost` when someone
  else took it, so a stale holder never commits over the new holder's work. What remains is the
  window between that check and the commit itself (one S3 request): a pause exactly there is not
  fenced; S3 offers no fencing token on ordinary writes.

Clock: expiry is decided with the S3 server's clock only: the age of a lease is the `Date` header of
the GET that reads it minus its `Last-Modified`, both stamped by the server, so the machines' own
clocks may be skewed by any amount. Both headers have one-second resolution, so a lease counts as
expired only when that age minus one second is at least its ttl. (Only an S3 endpoint that sends no
`Date` header falls back to this machine's clock, which then must be in sync.) The times in the
body (since, renewed_at, expires_at) are the server's clock as estimated from the `Date` of the
holder's last response; they are for people and `evoforge status`, not for the decision.

ttl: EVOFORGE_LOCK_TTL_SECONDS (default 60). A holder renews every ttl/3, so a live lease is never
older than about ttl/3 (a renewal may fail twice before the lease is at risk); a dead holder's run
is free again between ttl and ttl + 2 s after its last renewal, so at most ttl + 2 s after it died.
The taker uses the ttl written in the lease (the holder's), not its own.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime

from evoforge.data.lock_errors import LeaseLost, LockUnavailable, RunBusy

log = logging.getLogger(__name__)

TTL_ENV = "EVOFORGE_LOCK_TTL_SECONDS"
DEFAULT_TTL_SECONDS = 60.0
LOCK_NAME = "_lock.json"
_CONFLICT = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}  # the object changed under us
_MISSING = {"NoSuchKey", "404"}
_TAKE_ATTEMPTS = 5


def lease_ttl() -> float:
    raw = os.environ.get(TTL_ENV, "").strip()
    if not raw:
        return DEFAULT_TTL_SECONDS
    try:
        ttl = float(raw)
    except ValueError:
        ttl = -1.0
    if not ttl > 0:
        raise ValueError(f"{TTL_ENV}={raw!r} is not a positive number of seconds")
    return ttl


_S3_PREFIX = re.compile(r"^s3:/+")


def is_s3(run_dir) -> bool:
    return bool(_S3_PREFIX.match(str(run_dir)))


def lock_uri(run_dir) -> str:
    """`s3://bucket/prefix/run` -> `s3://bucket/prefix/run/_lock.json` (a pathlib-mangled `s3:/` too)."""
    rest = _S3_PREFIX.sub("", str(run_dir)).strip("/")
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise ValueError(f"{run_dir!s} is not a run folder on S3 (expected s3://bucket/prefix/run)")
    return f"s3://{bucket}/{key}/{LOCK_NAME}"


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="seconds")


def _error_code(err: Exception) -> str:
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        error = response.get("Error") or {}
        code = error.get("Code") or str((response.get("ResponseMetadata") or {}).get("HTTPStatusCode", ""))
        return str(code or type(err).__name__)
    return type(err).__name__


def _one_line(err: Exception) -> str:
    response = getattr(err, "response", None)
    message = ((response.get("Error") or {}).get("Message") if isinstance(response, dict) else None) or str(err)
    return " ".join(str(message).split())


def _server_date(response: dict) -> datetime | None:
    raw = ((response.get("ResponseMetadata") or {}).get("HTTPHeaders") or {}).get("date")
    try:
        return parsedate_to_datetime(raw) if raw else None
    except (TypeError, ValueError):
        return None


MACHINE_ENV = "EVOFORGE_MACHINE_ID"


def _process_space() -> str:
    """What makes a pid meaningful: the host's boot and this pid namespace (or EVOFORGE_MACHINE_ID, for
    hosts where those cannot tell machines apart). A lease written from the same process space whose
    pid is gone was left by a process that died (kill -9, a crash), so the next command on this
    machine need not wait out its ttl; from anywhere else only the ttl counts."""
    if os.environ.get(MACHINE_ENV):
        return os.environ[MACHINE_ENV]
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""  # no way to tell: leases from here expire by their age only
    return f"{socket.gethostname()}/{boot}/{namespace}"


def _holder_died_here(info: dict) -> bool:
    space = _process_space()
    if not space or info.get("process_space") != space or not isinstance(info.get("pid"), int):
        return False
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def _describe(info: dict) -> str:
    """`what (pid P on host, since T`: the caller closes the parenthesis, after what it adds."""
    get = info.get
    return f"{get('what', '?')} (pid {get('pid', '?')} on {get('host', '?')}, since {get('since', '?')}"


class S3Lease:
    """One holder's lease of one run. `acquire()` takes it (RunBusy while someone else's is live),
    a daemon thread renews it, `check()` raises LeaseLost once it was taken over, `release()`
    deletes it if it is still ours."""

    def __init__(self, run_dir, what: str, ttl: float | None = None, client=None):
        self.uri = lock_uri(run_dir)
        self.bucket, self.key = _split(self.uri)
        self.run = self.key.rsplit("/", 2)[-2]
        self.what = what
        self.ttl = float(ttl) if ttl is not None else lease_ttl()
        self.holder = uuid.uuid4().hex
        self._client = client
        self._lock = threading.Lock()  # one conditional write at a time: the etag is ours to keep
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._etag: str | None = None
        self._seq = 0
        self._since: str | None = None
        self._offset = 0.0  # server clock - this machine's clock, from the Date of the last response
        self._lost: str | None = None
        self.held = False

    # -- S3 plumbing ---------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            # a session of our own: boto3's default session is not safe to share between threads;
            # endpoint and credentials come from the usual AWS variables (AWS_ENDPOINT_URL, ...)
            timeout = max(2.0, self.ttl / 3)
            self._client = boto3.session.Session().client(
                "s3", config=Config(connect_timeout=timeout, read_timeout=timeout,
                                    retries={"max_attempts": 3, "mode": "standard"}))
        return self._client

    def _errors(self):
        from botocore.exceptions import BotoCoreError, ClientError

        return BotoCoreError, ClientError

    def _unavailable(self, err: Exception) -> LockUnavailable:
        return LockUnavailable(f"cannot lock run {self.run!r} in S3 bucket {self.bucket!r}: {_error_code(err)} "
                               f"({_one_line(err)[:200]}); check the bucket, AWS_ENDPOINT_URL and the credentials "
                               f"(lock: {self.uri})")

    def _now(self) -> datetime:
        """The server's clock, as estimated from the Date of the last response."""
        return datetime.now(timezone.utc) + timedelta(seconds=self._offset)

    def _saw(self, response: dict) -> None:
        date = _server_date(response)
        if date is not None:
            self._offset = (date - datetime.now(timezone.utc)).total_seconds() + 0.5  # Date is truncated

    def _body(self, **extra) -> bytes:
        self._seq += 1
        now = self._now()
        self._since = self._since or _iso(now)
        return json.dumps({"holder": self.holder, "what": self.what, "pid": os.getpid(), "host": socket.gethostname(),
                           "process_space": _process_space(), "since": self._since, "renewed_at": _iso(now),
                           "expires_at": _iso(now + timedelta(seconds=self.ttl)), "ttl_seconds": self.ttl,
                           "seq": self._seq, **extra}).encode()

    def _put(self, body: bytes, **condition) -> str:
        response = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body,
                                          ContentType="application/json", **condition)
        self._saw(response)
        return response["ETag"]

    def _read(self) -> dict | None:
        """The lease as it is now: body, etag, age by the server's clock; None if there is none."""
        _, ClientError = self._errors()
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as err:
            if _error_code(err) in _MISSING:
                return None
            raise
        raw = response["Body"].read()
        try:
            info = json.loads(raw.decode())
            if not isinstance(info, dict):
                raise ValueError
        except ValueError:
            info = {}  # unreadable: it expires like any other lease, by its age
        date = _server_date(response)
        if date is None:  # no Date header: this machine's clock has to stand in for the server's
            date = datetime.now(timezone.utc)
        age = (date - response["LastModified"]).total_seconds()
        try:
            ttl = float(info.get("ttl_seconds"))
            ttl = ttl if ttl > 0 else self.ttl
        except (TypeError, ValueError):
            ttl = self.ttl
        died_here = _holder_died_here(info)
        return {"info": info, "etag": response["ETag"], "age": max(age, 0.0), "ttl": ttl, "died_here": died_here,
                "expired": age - 1.0 >= ttl or died_here}  # both stamps are whole seconds: count the worst case

    # -- the lease -----------------------------------------------------------------------------
    def acquire(self) -> "S3Lease":
        BotoCoreError, ClientError = self._errors()
        try:
            for _ in range(_TAKE_ATTEMPTS):
                try:
                    self._etag = self._put(self._body(), IfNoneMatch="*")
                    return self._start()
                except ClientError as err:
                    if _error_code(err) not in _CONFLICT:
                        raise
                current = self._read()
                if current is None:
                    continue  # released between the two requests: create it again
                if current["info"].get("holder") == self.holder:  # our create went through, its answer got lost
                    self._etag = current["etag"]
                    return self._start()
                if not current["expired"]:
                    raise RunBusy(self._busy(current))
                try:
                    body = self._body(took_over=_describe(current["info"]) + ")")
                    self._etag = self._put(body, IfMatch=current["etag"])
                except ClientError as err:
                    if _error_code(err) not in _CONFLICT | _MISSING:
                        raise
                    continue  # another taker won, or the holder renewed after all: look again
                if current["died_here"]:
                    log.warning("run %r: took over the lease of %s), whose process on this machine is gone",
                                self.run, _describe(current["info"]))
                else:
                    log.warning("run %r: took over the expired lease of %s), last renewed %.0f s ago (ttl %.0f s)",
                                self.run, _describe(current["info"]), current["age"], current["ttl"])
                return self._start()
        except (BotoCoreError, ClientError) as err:
            raise self._unavailable(err) from None
        raise RunBusy(f"run {self.run!r} is busy: its lock changed hands {_TAKE_ATTEMPTS} times while this process "
                      f"tried to take it; try again (lock: {self.uri})")

    def _busy(self, current: dict) -> str:
        info = current["info"]
        who = (f"{_describe(info)}, lease renewed {current['age']:.0f} s ago, "
               f"expires in {max(current['ttl'] - current['age'], 0):.0f} s)") if info else \
            f"an unreadable lease written {current['age']:.0f} s ago (it expires {current['ttl']:.0f} s after that)"
        return (f"run {self.run!r} is busy: {who}; wait for it to finish or stop that process "
                f"(lock: s3://{self.bucket}/{self.key})")

    def _start(self) -> "S3Lease":
        self.held = True
        self._thread = threading.Thread(target=self._heartbeat, name=f"evoforge-lease-{self.run}", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        BotoCoreError, ClientError = self._errors()
        while not self._stop.wait(self.ttl / 3):
            try:
                self._renew()
            except LeaseLost:
                return
            except (BotoCoreError, ClientError) as err:  # S3 unreachable for a while: keep trying until it answers
                log.warning("run %r: could not renew its lease (%s); retrying in %.0f s", self.run, _error_code(err),
                            self.ttl / 3)

    def _renew(self) -> None:
        """Rewrite the lease if it is still ours; LeaseLost if someone else took it."""
        _, ClientError = self._errors()
        with self._lock:
            if self._lost:
                raise LeaseLost(self._lost)
            if self._stop.is_set() and not self.held:
                return
            try:
                self._etag = self._put(self._body(), IfMatch=self._etag)
                return
            except ClientError as err:
                if _error_code(err) not in _CONFLICT | _MISSING:
                    raise
            current = self._read()  # a write whose answer got lost changed the etag: is it still ours?
            if current is not None and current["info"].get("holder") == self.holder:
                self._etag = current["etag"]
                self._etag = self._put(self._body(), IfMatch=self._etag)
                return
            now = f"it is now held by {_describe(current['info'])})" if current and current["info"] else \
                "its lock object is gone"
            self._lost = (f"lost the lock of run {self.run!r} ({self.what}, held since {self._since}): this process "
                          f"did not renew its lease within {self.ttl:g} s and {now}; not committing over that "
                          f"holder's work, run the stage again once the run is free (lock: {self.uri})")
            log.error("%s", self._lost)
            raise LeaseLost(self._lost)

    def check(self) -> None:
        """Just before a commit: LeaseLost if this lease was taken over. Renews it synchronously
        (S3 decides, not this process's clocks, which stand still while it is paused), so a commit
        right after a passing check has a whole ttl before anyone may take the run over."""
        if self._lost:
            raise LeaseLost(self._lost)
        if not self.held:
            raise LeaseLost(f"the lock of run {self.run!r} is not held by this process (lock: {self.uri})")
        BotoCoreError, ClientError = self._errors()
        try:
            self._renew()
        except (BotoCoreError, ClientError) as err:
            raise LockUnavailable(f"cannot confirm the lock of run {self.run!r} in S3 bucket {self.bucket!r} before "
                                  f"committing: {_error_code(err)} ({_one_line(err)[:200]}); not committing "
                                  f"(lock: {self.uri})") from None

    @property
    def lost(self) -> str | None:
        return self._lost

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (never the next holder's)."""
        BotoCoreError, ClientError = self._errors()
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(self.ttl, 10))
        with self._lock:
            if not self.held:
                return
            self.held = False
            if self._lost:
                log.warning("run %r: not deleting its lock: the lease was taken over (%s)", self.run, self.uri)
                return
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self._etag)
            except ClientError as err:
                code = _error_code(err)
                if code in _MISSING:
                    return
                if code in _CONFLICT:
                    log.warning("run %r: not deleting its lock: another holder took it over (%s)", self.run, self.uri)
                    return
                log.warning("run %r: could not delete its lock (%s); it expires in %.0f s (%s)", self.run, code,
                            self.ttl, self.uri)
            except BotoCoreError as err:
                log.warning("run %r: could not delete its lock (%s); it expires in %.0f s (%s)", self.run,
                            _error_code(err), self.ttl, self.uri)


# -- the run lock on S3: re-entrant per thread, like the flock in runlock.py --------------------
_held: dict[str, list] = {}  # lock uri -> [owning thread, depth, S3Lease | None while it is being taken]
_guard = threading.Lock()


@contextmanager
def s3_run_lock(run_dir, what: str):
    uri = lock_uri(run_dir)
    run = uri.rsplit("/", 2)[-2]
    me = threading.get_ident()
    with _guard:
        holder = _held.get(uri)
        if holder is not None and holder[0] != me:
            raise RunBusy(f"run {run!r} is busy: another thread of this process (pid {os.getpid()}) "
                          f"holds its lock; wait for it to finish (lock: {uri})")
        if holder is None:
            holder = _held[uri] = [me, 0, None]  # reserved: this process's other threads are refused
        holder[1] += 1
    if holder[2] is None:
        try:
            holder[2] = S3Lease(run_dir, what).acquire()
        except BaseException:
            with _guard:
                del _held[uri]
            raise
    try:
        yield holder[2]
    finally:
        with _guard:
            holder[1] -= 1
            release = holder[1] == 0
            if release:
                del _held[uri]
        if release:
            holder[2].release()


def held_lease(run_dir) -> S3Lease | None:
    """The lease this process holds for the run (or for the run a path inside it belongs to)."""
    if not is_s3(run_dir):
        return None
    target = _S3_PREFIX.sub("s3://", str(run_dir)).rstrip("/") + "/"
    with _guard:
        for uri, (_, _, lease) in _held.items():
            if lease is not None and target.startswith(uri[: -len(LOCK_NAME)]):
                return lease
    return None


def check_run_lease(run_dir_uri) -> None:
    """Before a commit to a run: LeaseLost if this process held the run's lease and it was taken over.
    A no-op for a local run (the flock cannot be lost) or when this process holds no lock of the run.
    The lease checked is this process's for that run, whichever of its threads took it: a process
    whose lease was taken over must commit nothing to that run."""
    lease = held_lease(run_dir_uri)
    if lease is not None:
        lease.check()
