"""Small, general training helpers shared by train_style_encoder.py and train.py.

- ``CheckpointManager``: complete checkpoints as ``DIR/checkpoints/NNNNNN.pt`` (the step, zero-padded
  to six digits), written atomically through checkpoint.save_checkpoint, the last ``keep`` kept; those
  of an abandoned continuation set aside when a run restarts from an earlier step.
  ``estimated_checkpoint_bytes`` / ``CheckpointManager.room_warning``: a run's start says when they will not fit.
- ``load_optimizer_state`` / ``load_scaler_state``: resume an optimizer (moments from the checkpoint,
  hyperparameters from this run) and a GradScaler (also from a run that had none).
- ``rng_state`` / ``set_rng_state``: Python, NumPy, torch CPU and (when present) CUDA generator
  states as a dict that a weights-only ``torch.load`` accepts; ``gather_rng_states`` /
  ``restore_rng_states`` for one entry per rank.
- ``write_json`` / ``write_config``: atomic JSON (``DIR/config.json``).
- ``ScalarLogger``: TensorBoard scalars plus one JSON line per call in ``logs/scalars.jsonl``;
  a no-op off rank 0; a continued run's later records moved aside. ``RunMonitor``: the loop's bar, logs, speed.
- ``check_finite``: stops a run on a NaN/inf loss (or gradient) with a clear ``NonFiniteLossError``;
  ``NonFiniteGuard``: skips a few non-finite steps first (mixed precision).
- ``default_device``, ``rank_seed``, ``seed_everything`` (per-rank seeding), ``accumulate`` (EMA,
  e.g. ``g_ema``).

Nothing happens at import (TensorBoard is imported when a logger is created).
"""
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from checkpoint import CheckpointError, load_checkpoint, save_checkpoint, tensor_bytes
from fileio import (DiskFullError, atomic_path, atomic_write_bytes, disk_full_named, exit_on_sigterm, free_bytes,
                    is_disk_full, remove_dead_temporaries)
from distributed import all_gather_object, cleanup, get_rank, get_world_size, is_main, unwrap

CHECKPOINT_NAME = re.compile(r"^(\d{6,})\.pt$")


# ---- checkpoints --------------------------------------------------------------------------------

class CheckpointManager:
    """Numbered checkpoints in ``run_dir/checkpoints``, the newest ``keep`` kept.

    save(step, state) writes ``NNNNNN.pt`` atomically (temp file + os.replace) on rank 0 only and
    then deletes the oldest files beyond ``keep``; a crash mid-write leaves the previous checkpoints
    intact. latest() is the path of the highest step, or None.
    """

    def __init__(self, run_dir, keep=3):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.dir = os.path.join(os.fspath(run_dir), "checkpoints")
        self.keep = keep

    def path(self, step):
        return os.path.join(self.dir, f"{int(step):06d}.pt")

    def list(self):
        """[(step, path)] of the finished checkpoints, oldest first."""
        if not os.path.isdir(self.dir):
            return []
        found = []
        for name in os.listdir(self.dir):
            m = CHECKPOINT_NAME.match(name)
            if m:
                found.append((int(m.group(1)), os.path.join(self.dir, name)))
        return sorted(found)

    def latest(self):
        found = self.list()
        return found[-1][1] if found else None

    def set_aside_after(self, step):
        """Move the checkpoints numbered above ``step`` into ``checkpoints/superseded/`` (rank 0); returns
        their new paths. A run that continues from ``step`` (an explicit older checkpoint, or a fresh start
        in a used folder) abandons them: left in place, ``--resume latest`` would pick them up again."""
        stale = [path for n, path in self.list() if n > step]
        if not stale or not is_main():
            return []
        folder = os.path.join(self.dir, "superseded")
        os.makedirs(folder, exist_ok=True)
        moved = []
        for path in stale:
            target = os.path.join(folder, os.path.basename(path))
            if os.path.exists(target):
                target = os.path.join(folder, f"{time.strftime('%Y%m%d-%H%M%S')}-{os.path.basename(path)}")
            os.replace(path, target)
            moved.append(target)
        return moved

    def remove_dead_temporaries(self):
        """Rank 0: delete what processes killed mid-write (SIGKILL, out of memory) left in the run folder and
        its checkpoints/ (a whole checkpoint each: GBs with E_style); returns their paths."""
        if not is_main():
            return []
        return [path for folder in (os.path.dirname(self.dir), self.dir) for path in remove_dead_temporaries(folder)]

    def room_warning(self, checkpoint_bytes):
        """checkpoint_room_warning for this folder, its ``keep`` and the checkpoints already in it."""
        return checkpoint_room_warning(self.dir, self.keep, checkpoint_bytes, len(self.list()))

    def save(self, step, state):
        """Write ``state`` (a dict of tensors/containers/numbers/strings) as this step's checkpoint.

        Returns the path (on every rank; only rank 0 writes). Off rank 0 nothing is written.
        """
        path = self.path(step)
        if not is_main():
            return path
        save_checkpoint(state, path)
        for _, old in self.list()[:-self.keep]:
            try:
                os.remove(old)
            except FileNotFoundError:
                pass
        return path


def estimated_checkpoint_bytes(parts, optimizers=()):
    """About the bytes of a checkpoint holding ``parts`` (modules, or the state dicts the trainer saves) and the
    Adam moments of ``optimizers``: two tensors the size of each parameter they update (made at the first step,
    so counted before it)."""
    weights = sum(tensor_bytes(p.state_dict() if isinstance(p, torch.nn.Module) else p) for p in parts)
    moments = sum(2 * p.numel() * p.element_size() for optimizer in optimizers for group in optimizer.param_groups
                  for p in group["params"] if p.requires_grad)
    return weights + moments


def size_text(n):
    """Bytes as '2.4 GB' (decimal units; MB below 1 GB)."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def checkpoint_room_warning(folder, keep, checkpoint_bytes, existing=0):
    """A warning line when the file system of ``folder`` (checkpoints/) has no room for the checkpoints a run
    will write, else None. A save writes the new file before it deletes the oldest beyond ``keep``, so keep + 1
    exist at its peak; the ``existing`` ones (a resumed run's) already have their room. A warning only: space
    may be freed before the first save."""
    free = free_bytes(folder)
    if free >= max(keep + 1 - existing, 1) * checkpoint_bytes:
        return None
    return (f"warning: checkpoints here take ~{size_text(checkpoint_bytes)} each and --keep {keep} needs room for "
            f"{keep + 1} at a save; {size_text(free)} free in {folder}: the run will stop at a save (make room or "
            "lower --keep)")


def resolve_resume(resume, run_dir):
    """``--resume`` value -> checkpoint path or None: a file, or 'latest' (newest in run_dir, else None)."""
    if resume in (None, ""):
        return None
    if resume == "latest":
        return CheckpointManager(run_dir).latest()
    return os.fspath(resume)


def load_optimizer_state(optimizer, state, log=None, what="the optimizer"):
    """Restore an optimizer's moments and step counts from ``state`` while keeping the hyperparameters it
    was built with (lr, betas, ...): a resumed run follows its own command line, not the checkpoint's.
    Returns the changed hyperparameters as 'name old -> new' strings; ``log`` (when given) gets one note
    naming them."""
    built = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    changed = []
    for group, hyper in zip(optimizer.param_groups, built):
        for name in ("lr", "betas", "eps", "weight_decay"):
            old = group.get(name)
            old = tuple(old) if isinstance(old, list) else old  # betas may come back as a list
            if name in hyper and old != hyper[name]:
                changed.append(f"{name} {old} -> {hyper[name]}")
        group.update(hyper)
    if changed and log is not None:
        log(f"note: {what} follows this run's options: {', '.join(changed)}")
    return changed


def load_scaler_state(scaler, state):
    """Restore a GradScaler; a saved disabled scaler (an empty state: the run was float32 or bfloat16) leaves
    this one at its initial scale, as a new float16 run starts."""
    if state:
        scaler.load_state_dict(state)


# ---- random number generators ------------------------------------------------------------------

def rng_state():
    """All global generator states of this process, as tensors/ints (weights-only loadable)."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The generator of this process's own (current) device, the only one it draws from: restored to
        # whichever device the resumed process runs on (rank r may sit on another local index then).
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    """Restore what rng_state() returned (CUDA only when both the state and a GPU are there)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        if isinstance(saved, (list, tuple)):  # older checkpoints: every visible device's, by index
            index = torch.cuda.current_device()
            saved = saved[index] if index < len(saved) else None
        if saved is not None:
            torch.cuda.set_rng_state(saved.cpu())


def gather_rng_states():
    """[rng_state() of rank 0, of rank 1, ...]: every rank must call it (a collective under torchrun)."""
    return all_gather_object(rng_state())


def restore_rng_states(states, seed=None):
    """Restore this rank's entry of gather_rng_states(); returns True if it did.

    When the checkpoint came from a different number of processes the states cannot be matched to
    ranks: with ``seed`` the generators are re-seeded per rank instead (one warning), else nothing
    is changed.
    """
    rank, world = get_rank(), get_world_size()
    if states is not None and len(states) == world:
        set_rng_state(states[rank])
        return True
    if is_main():
        warnings.warn(f"checkpoint holds RNG states of {0 if states is None else len(states)} processes, this run "
                      f"has {world}: random streams are re-seeded, not continued")
    if seed is not None:
        seed_everything(seed, rank)
    return False


def rank_seed(seed, rank=0, *salt):
    """A 63-bit seed derived from (seed, rank, *salt): distinct ranks/salts get unrelated streams."""
    text = ":".join(str(int(v)) for v in (seed, rank, *salt))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def seed_everything(seed, rank=0):
    """Seed Python, NumPy and torch (CPU and all GPUs) with rank_seed(seed, rank)."""
    s = rank_seed(seed, rank)
    random.seed(s)
    np.random.seed(s % 2 ** 32)
    torch.manual_seed(s)
    return s


# ---- config, logging ---------------------------------------------------------------------------

def _jsonable(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.device):
        return str(value)
    if hasattr(value, "__dict__"):  # argparse.Namespace and similar
        return {k: _jsonable(v) for k, v in vars(value).items()}
    return str(value)


def options_dict(options):
    """A dataclass / Namespace / dict of options as a JSON-ready dict (also used inside checkpoints)."""
    return _jsonable(options)


def write_json(path, obj):
    """Write ``obj`` as indented JSON atomically (temp file + os.replace), creating the folder."""
    with atomic_path(path, suffix=".json") as tmp:
        with open(tmp, "x") as f:
            json.dump(_jsonable(obj), f, indent=2, sort_keys=True)
            f.write("\n")


def write_config(run_dir, options, **extra):
    """``run_dir/config.json`` = the options plus ``extra`` entries (e.g. world_size); rank 0 only."""
    if not is_main():
        return None
    config = dict(options_dict(options))
    config.update(_jsonable(extra))
    path = os.path.join(os.fspath(run_dir), "config.json")
    write_json(path, config)
    return path


class ScalarLogger:
    """TensorBoard scalars in ``log_dir`` plus ``log_dir/scalars.jsonl`` ({"step": s, name: value, ...}).

    start: the step the run continues from (None: append to whatever is there). Records of later steps,
    written by a run that went past ``start`` (or by an earlier run in this folder, when starting at 0),
    move from scalars.jsonl to ``superseded/scalars-TIME.jsonl`` and TensorBoard hides their events, so
    that the continued run logs each step once and nothing is lost. A line that does not parse (a run
    killed mid-write) moves with them.
    A no-op off rank 0. Without the tensorboard package only the jsonl file is written (one warning).
    A full disk is a DiskFullError naming the file (no torn line is left in scalars.jsonl).
    Use as a context manager or call close().
    """

    def __init__(self, log_dir, enabled=None, start=None):
        self.enabled = is_main() if enabled is None else enabled
        self.writer = None
        self.jsonl = None
        if not self.enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(log_dir, "scalars.jsonl")
        if start is not None and os.path.isfile(path):
            self._set_aside_after(path, start)
        self.jsonl = open(path, "ab", buffering=0)  # one write per record (append_whole)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            warnings.warn(f"TensorBoard is not available ({e}); scalars go to scalars.jsonl only")
        else:
            self.events = os.path.join(log_dir, "events.out.tfevents.*")  # the file's name, as the messages give it
            quiet_tensorboard_threads()  # first: the writer thread writes the file's first event at once
            with disk_full_named(self.events, "TensorBoard's events file may be left empty"):
                self.writer = SummaryWriter(log_dir, purge_step=None if start is None else start + 1)

    @staticmethod
    def _set_aside_after(path, start):
        kept, later = [], []
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    step = json.loads(line).get("step", 0)
                except (ValueError, AttributeError):
                    step = None  # torn or foreign: not this run's record
                (kept if step is not None and step <= start else later).append(line.rstrip("\n") + "\n")
        if not later:
            return
        aside = os.path.join(os.path.dirname(path), "superseded", f"scalars-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        atomic_write_bytes(aside, "".join(later).encode())
        atomic_write_bytes(path, "".join(kept).encode())
        print(f"the run continues from step {start}: {len(later)} later log record(s) moved to {aside}")

    def log(self, step, scalars):
        """scalars: {name: number or 0-d tensor}; names may use '/' for TensorBoard groups."""
        if not self.enabled:
            return
        values = {k: float(v) for k, v in scalars.items()}
        if self.writer is not None:
            with self._writing_events():
                for k, v in values.items():
                    self.writer.add_scalar(k, v, step)
        with disk_full_named(self.jsonl.name, "the records before it are intact"):
            append_whole(self.jsonl, (json.dumps({"step": int(step), **values}) + "\n").encode())

    def _writing_events(self):
        """A full disk while TensorBoard writes is a DiskFullError naming its events file."""
        return disk_full_named(self.events, "the events logged before it are kept")

    def add_image(self, tag, image, step):
        """A TensorBoard image ([3, H, W] in [0, 1]; a sample grid), when TensorBoard is there."""
        if self.writer is not None:
            with self._writing_events():
                self.writer.add_image(tag, image, step)

    def close(self):
        writer, self.writer = self.writer, None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if writer is not None:
            with self._writing_events():
                writer.close()

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        close_after(self, error)


def append_whole(f, data):
    """Append ``data`` to the unbuffered binary file ``f`` whole or not at all: a write that fails (a full disk)
    truncates the file back to where it was, so that no torn record is left."""
    end = f.seek(0, os.SEEK_END)
    try:
        view = memoryview(data)
        while view:
            view = view[f.write(view):]
    except OSError:
        f.truncate(end)
        raise


def close_after(closable, error):
    """closable.close() at the end of a with-block; while ``error`` is on its way, a full disk found again by the
    closing (TensorBoard flushing its last events) is left unsaid: the first error is the one to report."""
    try:
        closable.close()
    except DiskFullError:
        if error is None:
            raise


def quiet_tensorboard_threads():
    """TensorBoard writes its events in a thread of its own, which prints the traceback of a full disk before
    the next add_scalar raises the same error in the main thread (there one DiskFullError line): that thread's
    traceback is left out. Installed once per process; other exceptions and threads print as before."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def hook(args):
        if not (type(args.thread).__module__.startswith("tensorboard.") and is_disk_full(args.exc_value)):
            previous(args)

    hook.quiets_tensorboard = True
    threading.excepthook = hook


class RunMonitor:
    """What every trainer's loop does around its own step, written once: the progress bar (rank 0), the
    ScalarLogger, a window of per-step scalars averaged at each log, speed over training time only
    (work inside ``aside()`` -- sample grids, checkpoints -- is left out), and when a periodic action is due.

        with RunMonitor(out_dir, total=iters, start=step, images_per_step=global_batch, progress=True) as run:
            while step < iters:
                ...one step...; step += 1
                run.update(stats, loss=f"{loss:.4f}")          # the bar's postfix as keywords
                if run.due(step, log_every):
                    run.log(step, {f"loss/{k}": v for k, v in run.means().items()})
                with run.aside():
                    if run.due(step, save_every): ...
    """

    def __init__(self, out_dir, total, start, images_per_step, progress=True, desc=None, window=None):
        self.total = total
        self.images_per_step = images_per_step
        checkpoints = CheckpointManager(out_dir)
        for stale in checkpoints.remove_dead_temporaries():
            print(f"removed {stale}: a file being written when its process was killed")
        moved = checkpoints.set_aside_after(start)
        if moved:
            print(f"the run continues from step {start}: {len(moved)} later checkpoint(s) of the run it replaces "
                  f"moved to {os.path.dirname(moved[0])}")
        self.logger = ScalarLogger(os.path.join(out_dir, "logs"), start=start)
        self.bar = None
        if progress and is_main() and start < total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, desc=desc)
        self._new_window(start)
        if window:  # a resumed run: the steps since the last log before its checkpoint (window_state)
            self.sums, self.counts = dict(window["sums"]), dict(window["counts"])

    def window_state(self):
        """The per-step scalars summed since the last log, for a checkpoint: a run resumed from it (``window``)
        logs the same means as an uninterrupted one, whatever --log_every and --save_every are."""
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def _new_window(self, step):
        self.sums, self.counts = {}, {}
        self.tick, self.tick_step = time.perf_counter(), step

    def due(self, step, every):
        """Every `every` steps, and at the last step."""
        return step % every == 0 or step == self.total

    def update(self, scalars, **postfix):
        """One step done: its scalars join the window; the bar advances (showing `postfix`)."""
        for k, v in scalars.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix(refresh=False, **postfix)  # drawn with the bar's own refresh

    def means(self):
        """{name: mean over the window's steps}."""
        return {k: v / self.counts[k] for k, v in self.sums.items()}

    def log(self, step, scalars):
        """Writes `scalars` with speed/it_per_s and speed/images_per_s of the window, then opens a new
        window. Returns what was written."""
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the window's queued GPU work is training time
        elapsed = max(time.perf_counter() - self.tick, 1e-9)
        steps = step - self.tick_step
        scalars = {**scalars, "speed/it_per_s": steps / elapsed,
                   "speed/images_per_s": steps * self.images_per_step / elapsed}
        self.logger.log(step, scalars)
        self._new_window(step)
        return scalars

    @contextmanager
    def aside(self):
        """Time spent in this block does not count as training time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.tick += time.perf_counter() - t0

    def close(self):
        if self.bar is not None:
            self.bar.close()
        self.logger.close()

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        close_after(self, error)


def read_jsonl(path):
    """The records of a scalars.jsonl file, as a list of dicts."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- guards, devices, EMA ------------------------------------------------------------------------

class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the run stops and the last written checkpoint stays the good one."""


def _resume_hint(last_checkpoint):
    return (f"the last good checkpoint is {last_checkpoint} (continue with --resume {last_checkpoint})"
            if last_checkpoint else "no checkpoint was written before it")


def _first_non_finite(losses):
    """(name, value) of the first NaN/inf among {name: tensor or number}, or None."""
    for name, value in losses.items():
        v = float(value.detach()) if torch.is_tensor(value) else float(value)
        if not math.isfinite(v):
            return name, v
    return None


def gradients_finite(params):
    """True when every ``.grad`` of ``params`` is finite (None counts as finite).

    A finite loss can still have an inf gradient (an overflow in the backward pass), which one optimizer
    step turns into NaN weights; a GradScaler tests its own scaled gradients, every other step needs this.
    One sum per tensor (NaN and inf propagate; no full-size temporary, unlike isfinite) and one sync.
    """
    sums = [p.grad.detach().sum() for p in params if p.grad is not None]
    return not sums or bool(torch.isfinite(torch.stack(sums)).all())


def _stopped(step, problem, last_checkpoint):
    return NonFiniteLossError(f"step {step}: {problem}; training stopped, {_resume_hint(last_checkpoint)}. "
                              "Lower --lr, use --amp off, or check the data.")


def check_finite(losses, step, last_checkpoint=None, params=None):
    """Raise NonFiniteLossError naming the loss (or the gradients), the step and the checkpoint to resume from.

    losses: {name: tensor or number}. Call it before the optimizer step so that no weights are updated
    from a bad loss, and with values every rank agrees on (e.g. the global loss) so that all ranks stop
    together. params: also require finite gradients (after backward, for a step no GradScaler checks;
    DDP has already averaged them, so the ranks agree). Tensors on a GPU make this a synchronisation point.
    """
    bad = _first_non_finite(losses)
    if bad is not None:
        raise _stopped(step, f"loss '{bad[0]}' is {bad[1]}", last_checkpoint)
    if params is not None and not gradients_finite(params):
        raise _stopped(step, "a gradient is not finite (the losses are)", last_checkpoint)


class NonFiniteGuard:
    """check_finite that tolerates a few bad steps: a non-finite loss skips that optimizer step; the run stops
    when one phase's losses stay non-finite for ``patience`` consecutive steps, or at once when the weights
    themselves are non-finite.

    check(phase, losses, step, last_checkpoint, params, gradients) -> True when the step may go ahead. Use
    values every rank agrees on (reduced losses), so that all ranks skip and stop together. gradients: a
    non-finite ``.grad`` in params is a bad step too (for steps no GradScaler checks, see gradients_finite).
    ``healthy``: no phase is in a run of bad steps (e.g. the moment to write a checkpoint).
    """

    def __init__(self, patience=4):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = patience
        self.bad_steps = {}  # phase -> consecutive non-finite steps

    @property
    def healthy(self):
        return not any(self.bad_steps.values())

    def check(self, phase, losses, step, last_checkpoint=None, params=(), gradients=False):
        params = list(params)
        bad = _first_non_finite(losses)
        if bad is not None:
            problem = f"loss '{bad[0]}' is {bad[1]}"
        elif gradients and not gradients_finite(params):
            problem = "a gradient is not finite (the losses are)"
        else:
            self.bad_steps[phase] = 0
            return True
        count = self.bad_steps.get(phase, 0) + 1
        self.bad_steps[phase] = count
        with torch.no_grad():
            weights_bad = any(not bool(torch.isfinite(p).all()) for p in params)
        if weights_bad:
            raise _stopped(step, f"{problem} and the weights are no longer finite", last_checkpoint)
        if count >= self.patience:
            raise _stopped(step, f"{problem}, non-finite for {count} consecutive steps", last_checkpoint)
        return False


def default_device():
    """'cuda' when torch sees a GPU, else 'cpu' (the default of every --device flag)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@torch.no_grad()
def accumulate(ema_model, model, decay=0.999, skip=()):
    """ema = decay * ema + (1 - decay) * model, parameter by parameter (``g_ema`` from ``g``); decay 0 copies.

    Parameters whose names start with a prefix in ``skip`` are left alone: a frozen sub-module the two
    models share (BlendGAN's 1.25 GB style encoder ``embedder.``) would only be blended with itself, at
    the cost of a pass over all its weights every step. DDP wrappers are unwrapped; both models must
    have the same parameter names.
    """
    skip = tuple(skip)
    ema_params = {k: v for k, v in unwrap(ema_model).named_parameters() if not k.startswith(skip)}
    params = {k: v for k, v in unwrap(model).named_parameters() if not k.startswith(skip)}
    if ema_params.keys() != params.keys():
        raise ValueError("accumulate: the two models have different parameters")
    for name, p in params.items():
        ema_params[name].lerp_(p.detach().to(ema_params[name].dtype), 1.0 - decay)


# ---- the trainer scripts' command line -----------------------------------------------------------

def add_run_args(parser, defaults):
    """--save_every, --keep, --log_every, --resume, --device, --num_workers, --no_progress: the run options
    of the style-encoder and pSp trainers (defaults: their options dataclass)."""
    d = defaults
    parser.add_argument("--save_every", type=int, default=d.save_every, help="iterations between checkpoints")
    parser.add_argument("--keep", "--keep_checkpoints", type=int, default=d.keep,
                        help="checkpoints kept (the newest); --keep_checkpoints is train.py's name for it")
    parser.add_argument("--log_every", type=int, default=d.log_every, help="iterations between logged scalars")
    parser.add_argument("--resume", default=None,
                        help="checkpoint to continue from, or 'latest' (newest in --out_dir)")
    parser.add_argument("--device", default=default_device(), help="cuda or cpu (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--num_workers", type=int, default=d.num_workers, help="DataLoader processes per rank")
    parser.add_argument("--no_progress", dest="progress", action="store_false", help="no tqdm bar")


def require_valid(problems):
    """A trainer's validate(options) -> list of problems, for code that calls train() itself: one
    ValueError naming them all (nothing when the list is empty)."""
    if problems:
        raise ValueError("; ".join(problems))


def checkpoint_tag(kind, version):
    """The keys that say which trainer wrote a checkpoint: {'kind': ..., 'version': ...}."""
    return {"kind": kind, "version": version}


def load_tagged_checkpoint(path, kind, what, hint="", aliases=()):
    """load_checkpoint(path), refused with one CheckpointError unless checkpoint_tag(kind, .) wrote it.

    what: the trainer's name in the message; hint: appended to it (what to use instead); aliases: other
    (key, value) pairs that mark the same kind (tags of older files).
    """
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != kind and not any(ckpt.get(k) == v for k, v in aliases):
        raise CheckpointError(f"checkpoint {path}: not a {what} checkpoint (kind {ckpt.get('kind')!r}, "
                              f"expected {kind!r}){hint}")
    return ckpt


def validated(parser, options, validate):
    """options, after validate(options) -> list of problems found nothing; else parser.error with them all."""
    problems = validate(options)
    if problems:
        parser.error("; ".join(problems))
    return options


def run_trainer(train, options, done, expected=()):
    """A trainer script's main: train(options), then print done(result) when it returns text.

    A non-finite loss, an unusable checkpoint, a full disk (a checkpoint, sample grid, log record or config.json
    that cannot be written: fileio.DiskFullError) or another of the `expected` exception types is one line
    on stderr and exit code 1 (the last good checkpoint stays); anything else keeps its traceback. The
    process group is left in any case.
    """
    # A scheduler's stop leaves no temporary checkpoint behind. One process only: a DDP rank waiting in a
    # collective runs no Python signal handler until the collective times out (30 min), so there SIGTERM
    # keeps its default, immediate effect (torchrun stops the ranks with it).
    guard = exit_on_sigterm() if get_world_size() == 1 else nullcontext()
    try:
        with guard:
            result = train(options)
    except (NonFiniteLossError, CheckpointError, DiskFullError, *expected) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        cleanup()
    message = done(result)
    if message:
        print(message)
    return 0
