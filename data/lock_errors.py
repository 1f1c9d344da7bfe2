"""What a run lock says when it cannot be had: one module that both kinds of lock (data/runlock.py's
flock, data/lease.py's S3 lease) raise from, so neither imports the other's errors."""
from __future__ import annotations


class RunBusy(RuntimeError):
    """Another process (or thread) holds the run: the message names it and since when."""


class LockUnavailable(RuntimeError):
    """The file system under the runs cannot lock (NFS mounted `nolock`: ENOLCK), or S3 refused the
    lease for another reason than a held lock (no bucket, no credentials, unreachable)."""


class LeaseLost(RuntimeError):
    """This process's lease of a run was taken over (it was not renewed within its ttl): whatever it
    was about to commit must not be committed."""
