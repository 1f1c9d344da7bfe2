"""The sandbox's seccomp filter: the system calls a step of model-written Python never needs, refused.

bubblewrap loads it (`--seccomp FD`: a compiled classic-BPF program, the form libseccomp exports) as the
last step before it starts the sandbox worker, with no_new_privs set, so the worker and every process
an execution starts inherit it and none can remove it.

Refused with EPERM: new namespaces (`unshare`, `setns`, and `clone` with a namespace flag: the nested
user namespace that gives uid 0 inside the sandbox), mounts of every kind, ptrace and reading or
writing another process's memory, the kernel keyring, BPF, perf events, userfaultfd, io_uring (its
operations bypass this filter), kernel modules, kexec, reboot, swap, the clock, quotas, accounting,
handles to files by inode. `clone3` gets ENOSYS: its flags sit in memory a filter cannot read, and
the C library falls back to `clone`, whose flags it can. A call of another architecture's ABI (x32,
i386 on x86_64) kills the process: the numbers above would mean other calls there.

Only x86_64 has a table (the machines evoforge runs on); elsewhere `program()` says why not, and the
sandbox refuses to run without the filter unless its config turns the filter off.
"""
from __future__ import annotations

import errno
import platform
import struct

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

# x86_64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl)
REFUSED_X86_64 = {
    "ptrace": 101, "syslog": 103, "uselib": 134, "ustat": 136, "sysfs": 139, "vhangup": 153, "pivot_root": 155,
    "_sysctl": 156, "adjtimex": 159, "chroot": 161, "acct": 163, "settimeofday": 164, "mount": 165, "umount2": 166,
    "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170, "setdomainname": 171, "iopl": 172,
    "ioperm": 173, "create_module": 174, "init_module": 175, "delete_module": 176, "get_kernel_syms": 177,
    "query_module": 178, "quotactl": 179, "nfsservctl": 180, "lookup_dcookie": 212, "clock_settime": 227,
    "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272, "perf_event_open": 298,
    "name_to_handle_at": 303, "open_by_handle_at": 304, "clock_adjtime": 305, "setns": 308,
    "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "finit_module": 313, "kexec_file_load": 320,
    "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "pidfd_getfd": 438, "mount_setattr": 442,
}
CLONE_X86_64, CLONE3_X86_64 = 56, 435
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET (NEWTIME, 0x80, is a signal number to clone)
CLONE_NAMESPACE_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000

# classic BPF, as the kernel's seccomp reads it (linux/filter.h, linux/seccomp.h)
LD_W_ABS, JEQ_K, JGE_K, JSET_K, RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
RET_ALLOW, RET_KILL_PROCESS = 0x7FFF0000, 0x80000000
NR_OFFSET, ARCH_OFFSET, ARG0_LOW_OFFSET = 0, 4, 16  # struct seccomp_data, little-endian


def _errno(code: int) -> int:
    return 0x00050000 | code  # SECCOMP_RET_ERRNO


def _op(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


class Unsupported(RuntimeError):
    pass


def program() -> bytes:
    """The filter for this machine, as bubblewrap's `--seccomp` reads it."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise Unsupported(f"the sandbox's seccomp filter has a system call table for x86_64 only, not "
                          f"{platform.machine()}")
    ops = [
        _op(LD_W_ABS, ARCH_OFFSET),
        _op(JEQ_K, AUDIT_ARCH_X86_64, jt=1, jf=0),
        _op(RET_K, RET_KILL_PROCESS),
        _op(LD_W_ABS, NR_OFFSET),
        _op(JGE_K, X32_SYSCALL_BIT, jt=0, jf=1),
        _op(RET_K, RET_KILL_PROCESS),
        _op(JEQ_K, CLONE3_X86_64, jt=0, jf=1),
        _op(RET_K, _errno(errno.ENOSYS)),
    ]
    for number in sorted(REFUSED_X86_64.values()):
        ops += [_op(JEQ_K, number, jt=0, jf=1), _op(RET_K, _errno(errno.EPERM))]
    ops += [
        _op(JEQ_K, CLONE_X86_64, jt=0, jf=3),  # not clone: allowed (the last instruction)
        _op(LD_W_ABS, ARG0_LOW_OFFSET),  # clone's flags
        _op(JSET_K, CLONE_NAMESPACE_FLAGS, jt=0, jf=1),
        _op(RET_K, _errno(errno.EPERM)),
        _op(RET_K, RET_ALLOW),
    ]
    return b"".join(ops)
