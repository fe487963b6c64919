"""fileio.py: output-folder checks, and a SIGTERM that leaves no temporary file behind."""
import os
import re
import signal
import socket
import subprocess
import sys

import fileio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Writes half a file through atomic_path, says so, then waits to be stopped.
WRITER = """import contextlib, sys, time
sys.path.insert(0, {root!r})
from fileio import atomic_path, exit_on_sigterm
guard = exit_on_sigterm() if sys.argv[2] == "guarded" else contextlib.nullcontext()
with guard:
    with atomic_path(sys.argv[1]) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half")
        print("ready", flush=True)
        time.sleep(60)
"""


def test_folder_problem_names_the_file_in_the_way(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert fileio.folder_problem(a_file) == f"{a_file} is a file, not a folder"
    assert fileio.folder_problem(a_file / "sub" / "deeper") == f"{a_file} is a file, not a folder"
    assert fileio.folder_problem(tmp_path) is None and fileio.folder_problem(tmp_path / "new" / "nested") is None
    assert fileio.folder_problems("--outdir", a_file) == [f"--outdir {a_file}: {a_file} is a file, not a folder"]
    assert fileio.folder_problems("--outdir", tmp_path) == []


def test_output_folder_is_never_the_input_folder_and_its_files_are_not_inputs(tmp_path):
    photos = tmp_path / "photos"
    (photos / "aligned").mkdir(parents=True)
    os.symlink(photos, tmp_path / "link")
    for outdir in (photos, tmp_path / "link", str(photos) + "/"):  # the same folder, however it is named
        assert fileio.input_folder_problems("--outdir", outdir, "--input_img_path", photos) == [
            f"--outdir {outdir} is the --input_img_path folder {photos}: the outputs would be written among (and "
            f"could replace) the inputs; use another folder (a subfolder of it is fine)"]
    for outdir in (photos / "aligned", tmp_path, tmp_path / "other"):
        assert fileio.input_folder_problems("--outdir", outdir, "--input_img_path", photos) == []
    assert fileio.input_folder_problems("--outdir", photos, "--input_img_path", photos / "a.jpg") == []  # a file

    paths = [str(photos / "a.jpg"), str(photos / "aligned" / "a.png"), str(photos / "aligneds.png"),
             str(tmp_path / "link" / "aligned" / "b.png")]
    assert fileio.without_outputs(paths, photos, photos / "aligned") == [str(photos / "a.jpg"),
                                                                          str(photos / "aligneds.png")]
    # the input folder inside the output folder: every input lies there, none is an output of this run
    assert fileio.without_outputs(paths, photos, tmp_path) == paths


def stop_writer(tmp_path, mode):
    """Run WRITER, SIGTERM it once its temporary file exists; (exit code, files left in the folder)."""
    out = tmp_path / mode
    out.mkdir()
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(root=ROOT))
    proc = subprocess.Popen([sys.executable, str(script), str(out / "result.bin"), mode], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=30)
    return code, sorted(os.listdir(out))


def test_sigterm_removes_the_temporary_file_and_exits_143(tmp_path):
    code, left = stop_writer(tmp_path, "guarded")
    assert code == 128 + signal.SIGTERM and left == []
    # without the guard the process dies mid-write and its temporary file stays (what the guard is for)
    code, left = stop_writer(tmp_path, "unguarded")
    assert code == -signal.SIGTERM and len(left) == 1 and left[0].startswith(".result.bin.")


def test_dead_writers_temporaries_are_removed_live_and_other_machines_stay(tmp_path, monkeypatch):
    """A writer killed mid-write (here by SIGTERM without the guard, as SIGKILL would) leaves its temporary;
    remove_dead_temporaries deletes it (files and folders, of one name when asked); a live process's, those of
    another machine or PID namespace (a shared folder: pids there mean other processes), files of other names,
    and one that cannot be removed stay."""
    code, (left,) = stop_writer(tmp_path, "unguarded")
    out = tmp_path / "unguarded"  # stop_writer's folder
    space = fileio.process_space()
    other_space = format(int(space, 16) ^ 1, "08x")
    pid = int(left.split(f".tmp-{space}-")[1].split("-")[0])
    assert code == -signal.SIGTERM and left.startswith(".result.bin.tmp-") and not fileio.pid_alive(pid)
    folder_of_dead = out / f".data.lmdb.tmp-{space}-{pid}-0123abcd"  # an unfinished LMDB
    (folder_of_dead / "sub").mkdir(parents=True)
    (folder_of_dead / "sub" / "data.mdb").write_bytes(b"half")
    locked = out / f".locked.bin.tmp-{space}-{pid}-0123abcd"
    stay = [f".result.bin.tmp-{space}-{os.getpid()}-4567cdef.pt", f".result.bin.tmp-{other_space}-{pid}-89abcdef",
            f"result.bin.tmp-{space}-{pid}-89abcdef", "result.bin", locked.name]
    for name in stay:
        (out / name).write_bytes(b"x")
    remove = os.remove

    def refuse(path):  # another user's file in a shared sticky folder (root may remove anything)
        if os.path.basename(path) == locked.name:
            raise PermissionError(1, "Operation not permitted", path)
        remove(path)

    monkeypatch.setattr(os, "remove", refuse)
    assert fileio.remove_dead_temporaries(out, "other.bin") == []
    assert fileio.remove_dead_temporaries(out, "result.bin") == [str(out / left)]
    assert fileio.remove_dead_temporaries(out) == [str(folder_of_dead)]
    assert sorted(os.listdir(out)) == sorted(stay)
    assert fileio.remove_dead_temporaries(tmp_path / "absent") == []


def test_process_space_names_the_machine_and_its_pid_namespace(monkeypatch):
    """Temporaries carry a short tag of hostname and PID namespace instead of the hostname: a fixed 8 characters
    (output names stay short), and containers sharing a hostname but not their pids get different tags."""
    here = fileio.process_space()
    assert re.fullmatch(r"[0-9a-f]{8}", here) and fileio.process_space() == here
    assert fileio.temporary_path("/data/x.pt", ".pt").startswith(f"/data/.x.pt.tmp-{here}-{os.getpid()}-")
    monkeypatch.setattr(os, "readlink", lambda path: "pid:[1]" if path == "/proc/self/ns/pid" else path)
    other_namespace = fileio.process_space()
    monkeypatch.setattr(socket, "gethostname", lambda: "another-host")
    assert len({here, other_namespace, fileio.process_space()}) == 3


def test_sigterm_handler_is_restored_after_the_block():
    before = signal.getsignal(signal.SIGTERM)
    with fileio.exit_on_sigterm():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_trainers_guard_one_process_runs_only(monkeypatch):
    """run_trainer turns SIGTERM into SystemExit for a one-process run; under torchrun (WORLD_SIZE > 1)
    the default stays, since a rank blocked in a collective would not run the handler."""
    import trainutil

    seen = []
    record = lambda options: seen.append(signal.getsignal(signal.SIGTERM))  # noqa: E731
    default = signal.getsignal(signal.SIGTERM)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert trainutil.run_trainer(record, None, lambda result: None) == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert trainutil.run_trainer(record, None, lambda result: None) == 0
    assert seen[0] is not default and seen[1] is default
    assert signal.getsignal(signal.SIGTERM) is default
