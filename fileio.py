"""Atomic file output, the one mechanism behind every file the project writes (images, videos, JSON,
checkpoints): write to a temporary file in the same folder, then os.replace it onto the target; a full disk
(ENOSPC, or a quota: EDQUOT) on the way is one ``DiskFullError`` naming the file (``disk_full_named``). Also
``pid_alive`` and ``remove_dead_temporaries``, which tell a temporary or lock left by a killed process from
one still in use, and ``exit_on_sigterm``, which lets those temporaries be removed when a job scheduler
stops the process."""
import contextlib
import errno
import hashlib
import os
import re
import shutil
import signal
import socket
import threading
import uuid


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(RuntimeError):
    """A file could not be written for lack of disk space (or quota); the message names it and the free space.
    Raised by the atomic writes, which leave no part of the file: what was written before it is intact."""


def is_disk_full(error):
    """Whether ``error``, or an error it was raised from or while handling, is an OSError ENOSPC / EDQUOT."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def free_bytes(path):
    """Free bytes (for this user) on the file system that holds, or would hold, ``path``."""
    probe = os.path.abspath(path)
    while not os.path.isdir(probe):  # a file, or a folder that could not be made
        probe = os.path.dirname(probe)
    return shutil.disk_usage(probe).free


def disk_full_message(path, detail=""):
    """'cannot write PATH: the disk is full (N MiB free in FOLDER{detail})', FOLDER being path's folder."""
    folder = os.path.dirname(os.path.abspath(path))
    return f"cannot write {path}: the disk is full ({free_bytes(folder) / 2**20:.0f} MiB free in {folder}{detail})"


@contextlib.contextmanager
def disk_full_named(path, note="no part of it was left there"):
    """Within the block, an error that is_disk_full becomes one DiskFullError: disk_full_message(path) and
    ``note`` (what became of the file), instead of e.g. '[Errno 28] No space left on device' and a traceback."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise DiskFullError(f"{disk_full_message(path)}; {note}") from e


@contextlib.contextmanager
def atomic_path(path, suffix=".tmp"):
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path``, otherwise it
    is removed. ``path`` is always absent, the old file, or the complete new one. The temporary name
    ends with ``suffix`` (tools such as ffmpeg pick the format from it) and is created by the caller,
    so it gets the usual umask permissions. A full disk is a DiskFullError naming ``path`` (disk_full_named),
    raised once the temporary is gone (the free space it reports is what there is without it).
    """
    path = os.fspath(path)
    with disk_full_named(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = temporary_path(path, suffix)
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def process_space():
    """8 hex naming the processes whose pids this one can look up: this machine (hostname) and its PID
    namespace (two containers may share a hostname, e.g. with --network=host, and not their pids)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux
        namespace = ""
    return hashlib.sha1(f"{socket.gethostname()}/{namespace}".encode()).hexdigest()[:8]


def temporary_path(path, suffix=""):
    """'.{name}.tmp-{process space}-{pid}-{8 hex}{suffix}' beside ``path``: a temporary that names its writer, so
    that one a killed process left behind can be told from one being written (remove_dead_temporaries)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp-{process_space()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def remove_dead_temporaries(folder, name=None):
    """Delete the temporaries in ``folder`` (temporary_path's names; of ``name`` only, when given) whose writer,
    a process of this machine and PID namespace, is gone: what a SIGKILL, an out-of-memory kill or a power cut
    leaves (a whole checkpoint or unfinished LMDB). Those of live processes and of other machines or containers
    sharing the folder stay, and so does one that cannot be removed (another user's). Returns the removed paths."""
    if not os.path.isdir(folder):
        return []
    pattern = re.compile(rf"\.(.+)\.tmp-{process_space()}-(\d+)-[0-9a-f]{{8}}(\..*)?")
    removed = []
    for entry in sorted(os.listdir(folder)):
        m = pattern.fullmatch(entry)
        if not m or (name is not None and m.group(1) != name) or pid_alive(int(m.group(2))):
            continue
        path = os.path.join(folder, entry)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        except OSError:  # gone already (another run's start removed it), or not ours to remove
            continue
        removed.append(path)
    return removed


def atomic_write_bytes(path, data):
    """Write bytes to path through a temporary file and os.replace: no half-written output."""
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:
            f.write(data)


def pid_alive(pid):
    """Whether process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def folder_problem(path):
    """Why ``path`` cannot be (made) an output folder, or None when it can: a file where it or one of its
    parents should be a folder, or a nearest existing folder this user may not write in. Checked when the
    options are read, before any work that would otherwise end in a traceback at the first write."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"no permission to write in {probe}"
    return None


def folder_problems(flag, path):
    """[one line] naming option ``flag`` when ``path`` cannot be an output folder, else []."""
    problem = folder_problem(path)
    return [f"{flag} {path}: {problem}"] if problem else []


def within(path, folder):
    """Whether ``path`` is ``folder`` or lies under it, links resolved (real paths)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def input_folder_problems(out_flag, outdir, in_flag, in_folder):
    """[one line] when the output folder ``outdir`` is the input folder ``in_folder`` (links resolved), else
    []: the outputs would be written among the inputs, replace those of the same name, and be taken as inputs
    by the next run. An output folder inside the input folder is fine: see without_outputs."""
    if os.path.isdir(in_folder) and os.path.realpath(outdir) == os.path.realpath(in_folder):
        return [f"{out_flag} {outdir} is the {in_flag} folder {in_folder}: the outputs would be written among "
                f"(and could replace) the inputs; use another folder (a subfolder of it is fine)"]
    return []


def without_outputs(paths, in_folder, outdir):
    """``paths`` (found in ``in_folder``) without the files in the output folder ``outdir``: a run's outputs are
    not inputs of the next one. Unless ``in_folder`` itself lies in ``outdir``, where every input would."""
    if within(in_folder, outdir):
        return list(paths)
    return [p for p in paths if not within(p, outdir)]


def distinct_by(paths, key):
    """(the paths whose ``key`` no earlier path has, [(a later path, the earlier one with its key)]): outputs named
    by ``key`` (a.jpg and a.png both give 'a') would overwrite each other, so the later file is left out."""
    keyed = [(path, key(path)) for path in paths]
    first = {}
    for path, k in keyed:
        first.setdefault(k, path)
    return [p for p, k in keyed if first[k] == p], [(p, first[k]) for p, k in keyed if first[k] != p]


@contextlib.contextmanager
def exit_on_sigterm():
    """Within the block, SIGTERM (how job schedulers and `kill` stop a process) raises SystemExit(143) in
    the main thread, as Ctrl-C raises KeyboardInterrupt: the cleanup blocks run (atomic_path removes its
    temporary file, ffmpeg is closed) instead of the process vanishing mid-write. The previous handler is
    restored after; off the main thread nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def pool_worker_sigterm():
    """multiprocessing.Pool initializer: SIGTERM back to its default action (the process ends at once).

    Workers forked inside exit_on_sigterm inherit its handler, so Pool.terminate() (also run when a ``with
    Pool`` block ends) would make an idle worker raise SystemExit and run Python's exit path, which can
    block for ever on a lock the fork copied while another thread of the parent held it; the pool then
    waits for that worker. A worker that writes files wraps only the writing in exit_on_sigterm.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
