"""Every writer on a real full file system (a 1 MiB tmpfs, conftest.small_disk): one line that names the file and
says the disk is full, nothing half-written at the target, no temporary left, and the files before it intact."""
import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import prepare_data
import trainutil
from conftest import fill_disk
from evaluation import PartialResults
from fileio import DiskFullError, atomic_path, atomic_write_bytes, is_disk_full
from video import read_mp4, write_mp4

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACES = os.path.join(ROOT, "test_imgs", "face_imgs")
STYLES = os.path.join(ROOT, "test_imgs", "style_imgs")


def test_an_atomic_write_on_a_full_disk_names_the_file_and_keeps_the_old_one(small_disk):
    path = small_disk / "table1.csv"
    atomic_write_bytes(path, b"old rows\n")
    with pytest.raises(DiskFullError) as failure:
        atomic_write_bytes(path, bytes(2 * 2**20))
    # free space as it is once the temporary is gone: 1 MiB less the old file's page
    assert str(failure.value) == (f"cannot write {path}: the disk is full (1 MiB free in {small_disk}); no part of "
                                  f"it was left there")
    assert is_disk_full(failure.value.__cause__) and failure.value.__cause__.errno == errno.ENOSPC
    assert os.listdir(small_disk) == ["table1.csv"] and path.read_bytes() == b"old rows\n"
    # other failures keep their own error; a quota counts as a full disk
    with pytest.raises(PermissionError):
        with atomic_path(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded")) and not is_disk_full(OSError(errno.EIO, "I/O"))
    try:  # an error raised while handling a full disk (a 'raise ... from None' keeps it as the context) is one too
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise ValueError("could not finish the download") from None
    except ValueError as e:
        assert is_disk_full(e)
    # the checkpoint's DiskFullError is one of them (a trainer's expected errors catch either)
    assert issubclass(checkpoint.DiskFullError, DiskFullError)


def noise_frames(n, h, w, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_an_mp4_ffmpeg_could_not_finish_is_not_moved_into_place(small_disk):
    """imageio-ffmpeg does not look at ffmpeg's exit code: on a full disk the truncated mp4 became the output."""
    done = small_disk / "done.mp4"
    ramp = [np.full((32, 48, 3), 8 * i, np.uint8) for i in range(20)]
    assert write_mp4(done, ramp) == 20
    with pytest.raises(DiskFullError) as failure:
        write_mp4(small_disk / "big.mp4", noise_frames(40, 256, 256))  # ~8 MB of incompressible frames
    assert str(failure.value) == (f"cannot write {small_disk / 'big.mp4'}: the disk is full (1 MiB free in "
                                  f"{small_disk}); no part of it was left there")
    assert os.listdir(small_disk) == ["done.mp4"]
    frames, fps, codec = read_mp4(str(done))  # the video before it is whole
    assert frames.shape == (20, 32, 48, 3) and fps == 30 and "h264" in codec
    assert np.abs(frames.astype(float).mean(axis=(1, 2, 3)) - 8 * np.arange(20)).max() < 2


def test_ffmpeg_failing_for_another_reason_says_what_ffmpeg_said(tmp_path):
    """(fps 0: ffmpeg refuses the input; the wording of its last line depends on its version)"""
    with pytest.raises(RuntimeError, match=rf"^ffmpeg could not write {tmp_path / 'a.mp4'} \(exit code [1-9]\d*\): "
                                           r"\S.*$") as failure:
        write_mp4(tmp_path / "a.mp4", noise_frames(3, 16, 16), fps=0)
    assert not isinstance(failure.value, DiskFullError) and "no message" not in str(failure.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.timeout(120)
def test_ffmpeg_stopping_mid_stream_on_a_full_disk_is_a_full_disk(small_disk):
    """A clip as long as gen_video's fills the disk while frames are still being sent (a broken pipe, not the
    failure at the end that short clips get inside x264's lookahead): still the one full-disk error."""
    rng = np.random.default_rng(0)
    frames = (rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(400))
    with pytest.raises(DiskFullError, match=rf"^cannot write {small_disk / 'long.mp4'}: the disk is full"):
        write_mp4(small_disk / "long.mp4", frames)
    assert os.listdir(small_disk) == []


def test_a_full_disk_line_before_ffmpegs_last_line_is_a_full_disk(tmp_path, monkeypatch):
    """ffmpeg before 7 ends a failed run with 'Conversion failed!' after the line that says why (a system ffmpeg
    through IMAGEIO_FFMPEG_EXE can be one)."""
    import imageio_ffmpeg

    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\necho 'av_interleaved_write_frame(): No space left on device' >&2\n"
                    "echo 'Conversion failed!' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: str(fake))
    out = tmp_path / "out"
    with pytest.raises(DiskFullError, match=rf"^cannot write {out / 'a.mp4'}: the disk is full"):
        write_mp4(out / "a.mp4", noise_frames(3, 16, 16))
    assert os.listdir(out) == []


@pytest.mark.timeout(60)
def test_an_error_while_making_frames_stops_ffmpeg_and_leaves_nothing(tmp_path):
    """(an out-of-memory error or Ctrl-C in gen_video's generator): ffmpeg, still waiting for frames, is stopped;
    the error comes out as it is."""
    def frames():
        yield from noise_frames(3, 32, 32)
        raise RuntimeError("boom while making frame 3")

    with pytest.raises(RuntimeError, match="^boom while making frame 3$"):
        write_mp4(tmp_path / "a.mp4", frames())
    assert os.listdir(tmp_path) == []


def test_a_log_record_the_disk_has_no_room_for_leaves_no_torn_line(small_disk, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # scalars.jsonl only
    logs = small_disk / "logs"
    with pytest.warns(UserWarning, match="TensorBoard is not available"):
        logger = trainutil.ScalarLogger(logs)
    fill = fill_disk(small_disk, 4096)
    record = {"loss/total": 0.123456789, "speed/it_per_s": 12.5}
    with pytest.raises(DiskFullError) as failure:
        for step in range(1, 1000):  # a page holds ~60 records
            logger.log(step, record)
    assert str(failure.value) == (f"cannot write {logs / 'scalars.jsonl'}: the disk is full (0 MiB free in {logs}); "
                                  f"the records before it are intact")
    written = (logs / "scalars.jsonl").read_text()
    steps = [json.loads(line)["step"] for line in written.splitlines()]
    assert written.endswith("\n") and steps == list(range(1, step))  # whole records, the failed one not at all
    os.remove(fill)  # room again: the log goes on where it stopped
    logger.log(step, record)
    logger.close()
    assert [r["step"] for r in trainutil.read_jsonl(logs / "scalars.jsonl")] == list(range(1, step + 1))


LOGGING_TRAINER = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import trainutil
from conftest import fill_disk

def train(run_dir):
    if {full_at_start}:
        fill_disk({disk!r}, 0)
    with trainutil.RunMonitor(run_dir, total=10**6, start=0, images_per_step=1, progress=False) as run:
        fill_disk(run_dir, 4096)
        for step in range(1, 10**6):
            run.update({{"loss": 0.5}})
            run.log(step, {{f"loss/term{{k}}": float(k) for k in range(20)}})

sys.exit(trainutil.run_trainer(train, {run_dir!r}, lambda result: "done"))
"""


@pytest.mark.parametrize("full_at_start", [False, True])
def test_a_trainer_whose_logs_fill_the_disk_ends_with_one_line(small_disk, full_at_start):
    """TensorBoard's own writer thread printed its traceback first, also when the run started on a full disk; now
    the run ends with one line, exit code 1. (A subprocess: in pytest, a thread's traceback is not printed.)"""
    run_dir = small_disk / "run"
    run_dir.mkdir()
    code = LOGGING_TRAINER.format(root=ROOT, tests=os.path.join(ROOT, "tests"), disk=str(small_disk),
                                  run_dir=str(run_dir), full_at_start=full_at_start)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    logs = run_dir / "logs"
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr[-3000:]
    assert run.stderr.startswith(f"error: cannot write {logs}/"), run.stderr
    assert f": the disk is full (0 MiB free in {logs}); " in run.stderr
    if not full_at_start:
        assert trainutil.read_jsonl(logs / "scalars.jsonl")  # what was logged before reads back


class FailingClose:
    """A TensorBoard writer whose last flush (at close) finds the disk full."""

    def close(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_at_the_logs_close_is_said(tmp_path):
    """A run that is otherwise done but cannot flush its last TensorBoard events does not end quietly."""
    with pytest.raises(DiskFullError, match=rf"^cannot write {tmp_path}/events\.out\.tfevents\.\*: the disk is full"):
        with trainutil.ScalarLogger(tmp_path) as logger:
            logger.writer.close()
            logger.writer = FailingClose()


def test_the_first_full_disk_is_the_one_a_run_ends_with(tmp_path):
    """A checkpoint that does not fit, then TensorBoard failing at close: the run ends with the checkpoint's line
    (its size, --resume latest), not the events file's."""
    with pytest.raises(checkpoint.DiskFullError, match="^cannot write 000002.pt: the disk is full$"):
        with trainutil.RunMonitor(tmp_path, total=4, start=0, images_per_step=1, progress=False) as run:
            run.logger.writer.close()
            run.logger.writer = FailingClose()
            raise checkpoint.DiskFullError("cannot write 000002.pt: the disk is full")


def make_lmdb_args(out, size, folder, *extra):
    return ["--out", str(out), "--size", str(size), "--n_worker", "0", "--format", "png", *extra, folder]


@pytest.fixture
def lmdb_handles(monkeypatch):
    """prepare_data's shared read-only handles of this test, closed after it (before small_disk is unmounted)."""
    envs = {}
    monkeypatch.setattr(prepare_data, "_OPEN_ENVS", envs)
    yield
    for _, env in envs.values():
        env.close()


def lmdb_digest(path):
    with prepare_data.open_shared_lmdb(str(path)).begin() as txn:
        return dict(txn.cursor())


def test_packing_an_lmdb_on_a_full_disk_keeps_the_finished_one(small_disk, lmdb_handles, capsys):
    out = small_disk / "faces.lmdb"
    assert prepare_data.main(make_lmdb_args(out, 32, FACES)) == 0
    before = lmdb_digest(out)
    assert len(before) == 9 and before[b"length"] == b"8"
    fill = fill_disk(small_disk, 64 * 1024)
    capsys.readouterr()
    # LMDB says 'Input/output error' for the short write: the disk is named for what it is
    assert prepare_data.main(make_lmdb_args(out, 256, STYLES, "--overwrite")) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("packing ")]
    assert err == [f"error: cannot write {out}: the disk is full (0 MiB free in {small_disk}); {out} was left as it "
                   f"was and the unfinished LMDB removed"]
    assert sorted(os.listdir(small_disk)) == ["faces.lmdb", "fill"] and os.listdir(out) == ["data.mdb"]
    assert lmdb_digest(out) == before and prepare_data.lmdb_status(str(out))[:2] == ("complete", 8)
    # no room at all: LMDB's lock file, a memory map, was a SIGBUS that killed the process without a word
    os.remove(fill)
    fill_disk(small_disk, 0)
    new = small_disk / "styles.lmdb"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), *make_lmdb_args(new, 32, STYLES)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 1, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1] == (f"error: cannot write {new}: the disk is full (0 MiB free in "
                                                   f"{small_disk}); {new} was left as it was and the unfinished "
                                                   f"LMDB removed")
    assert sorted(os.listdir(small_disk)) == ["faces.lmdb", "fill"]


def test_an_lmdb_quota_is_named_as_one(tmp_path):
    """py-lmdb has no class for EDQUOT, and statvfs shows the disk's free space, not the quota's."""
    with pytest.raises(OSError) as failure:
        prepare_data.raise_if_disk_full(prepare_data.lmdb.Error("mdb_txn_commit: Disk quota exceeded"), str(tmp_path))
    assert failure.value.errno == errno.EDQUOT and is_disk_full(failure.value)
    assert failure.value.strerror == "mdb_txn_commit: Disk quota exceeded (over the disk quota)"
    assert failure.value.filename == str(tmp_path)


class ShortWriteEnv:
    """An LMDB environment whose commits fail as LMDB reports a short write."""

    def begin(self, write=False):
        raise prepare_data.lmdb.Error("mdb_txn_commit: Input/output error")

    def close(self):
        pass


@pytest.mark.parametrize("free_mib, disk_full", [(3.5, True), (4.5, False), (100, False)])
def test_a_short_write_is_a_full_disk_when_the_batch_and_a_mib_do_not_fit(tmp_path, monkeypatch, free_mib, disk_full):
    """EIO with less room than the pending batch (3 MiB here) and a MiB for LMDB's pages is a full disk; with room
    it stays the I/O error it is."""
    writer = prepare_data._LmdbWriter(str(tmp_path / "x.lmdb"), 2**20, False, "x", 0)
    writer.env.close()
    writer.env = ShortWriteEnv()
    writer.put(b"key", bytes(3 * 2**20 - 3))
    monkeypatch.setattr(prepare_data, "free_bytes", lambda path: int(free_mib * 2**20))
    with pytest.raises(OSError if disk_full else prepare_data.lmdb.Error) as failure:
        writer.flush()
    assert is_disk_full(failure.value) == disk_full


def test_evaluation_rows_the_disk_has_no_room_for_keep_the_rows_before(small_disk):
    outdir = small_disk / "evaluation"
    settings = {"ckpt": "g.pt", "n_samples": 100}
    partial = PartialResults(outdir, settings)
    partial.add("latent/0", {"fid": 12.5})
    fill_disk(small_disk, 0)
    with pytest.raises(DiskFullError) as failure:
        partial.add("latent/2", {"fid": 11.0, "note": "x" * 8192})
    path = outdir / "partial_results.json"
    assert str(failure.value) == (f"cannot write {path}: the disk is full (0 MiB free in {outdir}); no part of it "
                                  f"was left there")
    assert os.listdir(outdir) == ["partial_results.json"]
    assert PartialResults(outdir, settings).rows == {"latent/0": {"fid": 12.5}}  # a rerun resumes from it


def test_a_sample_grid_and_config_on_a_full_disk_stop_the_run_with_one_line(small_disk, capsys):
    from utils import save_grid

    run_dir = small_disk / "run"
    trainutil.write_config(run_dir, {"lr": 0.002})
    fill_disk(small_disk, 0)
    grid = small_disk / "run" / "samples" / "000100.png"
    assert trainutil.run_trainer(lambda options: save_grid(torch.rand(3, 64, 64), grid), None, lambda r: "done") == 1
    assert capsys.readouterr().err == (f"error: cannot write {grid}: the disk is full (0 MiB free in {grid.parent}); "
                                       f"no part of it was left there\n")
    with pytest.raises(DiskFullError, match=rf"^cannot write {run_dir / 'config.json'}: the disk is full"):
        trainutil.write_config(run_dir, {"lr": 0.002, "note": "x" * 8192})
    assert sorted(os.listdir(run_dir)) == ["config.json", "samples"] and os.listdir(run_dir / "samples") == []
    assert json.loads((run_dir / "config.json").read_text()) == {"lr": 0.002}


def test_the_checkpoint_room_warning_counts_keep_plus_one_less_those_already_there(small_disk):
    """1 MiB free: keep 2 needs room for 3 checkpoints at a save, of which a resumed run's are already paid for."""
    folder = str(small_disk / "run" / "checkpoints")  # not made yet
    third = 2**20 // 3 + 1  # three of them do not fit, two do
    assert trainutil.checkpoint_room_warning(folder, 2, third) == (
        f"warning: checkpoints here take ~0.3 MB each and --keep 2 needs room for 3 at a save; 1.0 MB free in "
        f"{folder}: the run will stop at a save (make room or lower --keep)")
    assert trainutil.checkpoint_room_warning(folder, 2, third, existing=1) is None
    assert trainutil.checkpoint_room_warning(folder, 1, third) is None
    assert trainutil.checkpoint_room_warning(folder, 1, 2**20 + 1, existing=5) is not None  # a save adds one
    assert trainutil.checkpoint_room_warning(folder, 3, 1.25e9).startswith("warning: checkpoints here take ~1.2 GB")


def test_a_resumed_runs_own_checkpoints_already_have_their_room(tmp_path, monkeypatch):
    """CheckpointManager.room_warning counts the checkpoints in its folder: keep 2 and two there, a third fits."""
    manager = trainutil.CheckpointManager(tmp_path, keep=2)
    os.makedirs(manager.dir)
    for step in (1, 2):
        open(manager.path(step), "wb").close()
    monkeypatch.setattr(trainutil, "free_bytes", lambda folder: 1000)
    assert manager.room_warning(1000) is None
    assert manager.room_warning(1001).startswith("warning: checkpoints here take")
