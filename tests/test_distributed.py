"""distributed.py (one process and two gloo processes on CPU) and trainutil.py."""
import copy
import json
import os
import random
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import distributed
import fileio
import trainutil
from checkpoint import load_checkpoint, save_checkpoint
from style_encoder import nt_xent


# ---- distributed.py, one process ----------------------------------------------------------------

@pytest.fixture
def no_torchrun(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def test_single_process_is_rank_zero_of_one(no_torchrun):
    assert distributed.get_rank() == 0 and distributed.get_world_size() == 1 and distributed.is_main()
    assert not distributed.is_distributed()
    assert distributed.init_distributed("cpu") == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    x = torch.randn(3, 4, requires_grad=True)
    assert distributed.all_gather_with_grad(x) is x
    m = distributed.reduce_mean(x)
    assert torch.equal(m, x) and not m.requires_grad
    assert distributed.reduce_dict({"a": torch.tensor(2.5), "b": 3}) == {"a": 2.5, "b": 3.0}
    assert distributed.all_gather_object(7) == [7]
    distributed.barrier()
    distributed.cleanup()


def test_a_process_group_made_by_the_caller_is_joined_for_a_world_of_one(no_torchrun, tmp_path, monkeypatch):
    """tools/gpu_check.py's DDP step makes a one-process group itself (torchrun's world of one makes none),
    so that train.py's DDP wrapping and collectives really run. The GPU is LOCAL_RANK's under torchrun, else
    the one asked for (a launcher of the caller's own picked it)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert distributed.is_distributed() and distributed.get_world_size() == 1
        assert distributed.init_distributed("cpu") == torch.device("cpu")
        chosen = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
        assert distributed.init_distributed("cuda:1") == torch.device("cuda", 1)
        monkeypatch.setenv("LOCAL_RANK", "0")
        assert distributed.init_distributed("cuda:1") == torch.device("cuda", 0)
        assert chosen == [torch.device("cuda", 1), torch.device("cuda", 0)]
        x = torch.randn(3, 4, requires_grad=True)
        gathered = distributed.all_gather_with_grad(x)
        assert gathered is not x and torch.equal(gathered, x) and gathered.requires_grad
        assert distributed.reduce_dict({"a": torch.tensor(2.5)}) == {"a": 2.5}
    finally:
        distributed.cleanup()
    assert not distributed.is_distributed()


def test_rank_from_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (distributed.get_rank(), distributed.get_world_size(), distributed.get_local_rank()) == (3, 4, 1)
    assert not distributed.is_main()


def test_cuda_request_without_gpu_is_a_clear_error(no_torchrun):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="--device cpu"):
        distributed.init_distributed("cuda")


def test_one_process_on_an_indexed_gpu_makes_it_the_current_device(no_torchrun, monkeypatch):
    """--device cuda:1 without torchrun: cuda:1 becomes the current device, so synchronize, memory stats,
    the CUDA ops' self-check and pin_memory (which take the current device) mean it, not cuda:0."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(torch.device(device)))
    assert distributed.init_distributed("cuda:1") == torch.device("cuda", 1)
    assert calls == [torch.device("cuda", 1)]
    calls.clear()
    assert distributed.init_distributed("cuda") == torch.device("cuda")  # the current one already
    assert distributed.init_distributed("cpu") == torch.device("cpu")
    assert calls == []


# ---- distributed.py, two gloo processes ---------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = distributed.init_distributed("cpu")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, generator=g)
    data = torch.randn(world * 4, 5, generator=g)  # the global batch, the same on every rank
    local = data[rank * 4:(rank + 1) * 4]
    weight = w.clone().requires_grad_(True)
    h = local @ weight  # [4, 3]
    gathered = distributed.all_gather_with_grad(h)  # [world * 4, 3]
    loss = nt_xent(gathered[0::2], gathered[1::2], 0.5)
    (loss * distributed.get_world_size()).backward()
    grad = weight.grad.clone()
    torch.distributed.all_reduce(grad)  # what DDP does, before its division by world size
    result = {
        "rank": distributed.get_rank(), "world": distributed.get_world_size(), "main": distributed.is_main(),
        "device": str(device), "gathered": gathered.detach().tolist(), "loss": float(loss),
        "grad": (grad / world).tolist(),
        "mean": distributed.reduce_mean(torch.tensor(float(rank))).item(),
        "dict": distributed.reduce_dict({"x": torch.tensor(float(rank + 1)), "y": 2.0 * rank}),
        "objs": distributed.all_gather_object(rank * 10),
    }
    distributed.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    distributed.cleanup()


def test_two_gloo_processes(tmp_path):
    world = 2
    mp.start_processes(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True,
                       start_method="spawn")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]

    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, generator=g)
    data = torch.randn(world * 4, 5, generator=g)
    weight = w.clone().requires_grad_(True)
    h = data @ weight
    loss = nt_xent(h[0::2], h[1::2], 0.5)
    loss.backward()

    for r, res in enumerate(results):
        assert (res["rank"], res["world"], res["main"], res["device"]) == (r, world, r == 0, "cpu")
        assert torch.allclose(torch.tensor(res["gathered"]), h.detach(), atol=1e-6)
        assert res["loss"] == pytest.approx(loss.item(), rel=1e-6)
        # Local-part gradients, summed over ranks and divided by world size as DDP does, give the
        # single-process gradient of the global batch.
        assert torch.allclose(torch.tensor(res["grad"]), weight.grad, atol=1e-6)
        assert res["mean"] == pytest.approx(0.5)
        assert res["dict"] == pytest.approx({"x": 1.5, "y": 1.0})
        assert res["objs"] == [0, 10]


# ---- trainutil.py --------------------------------------------------------------------------------

def test_checkpoint_manager_keeps_last_k_atomically(tmp_path, no_torchrun):
    manager = trainutil.CheckpointManager(tmp_path, keep=2)
    assert manager.latest() is None
    for step in (5, 10, 1000000):
        path = manager.save(step, {"step": step, "w": torch.full((2,), float(step))})
    assert os.path.basename(path) == "1000000.pt"
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == ["000010.pt", "1000000.pt"]  # no temporary files left, oldest removed
    assert manager.latest() == path
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 1000000 and torch.equal(ckpt["w"], torch.full((2,), 1e6))
    assert trainutil.resolve_resume("latest", tmp_path) == path
    assert trainutil.resolve_resume(None, tmp_path) is None
    assert trainutil.resolve_resume("latest", tmp_path / "empty") is None
    with pytest.raises(ValueError):
        trainutil.CheckpointManager(tmp_path, keep=0)


def test_checkpoint_manager_writes_on_rank_zero_only(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    path = trainutil.CheckpointManager(tmp_path).save(3, {"step": 3})
    assert path.endswith("000003.pt") and not os.path.exists(path)


def _draws():
    return (random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist())


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    trainutil.seed_everything(123)
    np.random.randn()  # leaves a cached Gaussian in NumPy's legacy state
    state = trainutil.rng_state()
    save_checkpoint({"rng": [state]}, tmp_path / "rng.pt")
    expected = _draws()
    trainutil.seed_everything(999)
    assert _draws() != expected
    loaded = load_checkpoint(tmp_path / "rng.pt")["rng"]
    assert trainutil.restore_rng_states(loaded)
    assert _draws() == expected


def test_cuda_rng_state_is_this_processs_device_and_goes_to_the_resumed_processs_device(monkeypatch):
    """Only the current device's CUDA generator is drawn from (cuda:LOCAL_RANK): its state is saved alone and
    restored to whatever device the resumed process is on, so rank r keeps its stream when it lands on
    another local index; older checkpoints (a list, one state per visible device) give the current index's."""
    states = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}
    current = {"device": 1}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["device"])
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[current["device"]])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(
        (int(state[0]), current["device"] if device == "cuda" else device)))
    saved = trainutil.rng_state()
    assert torch.equal(saved["cuda"], states[1])
    current["device"] = 0  # resumed as local rank 0 of another node layout
    trainutil.set_rng_state(saved)
    assert restored == [(1, 0)]
    restored.clear()
    trainutil.set_rng_state(dict(saved, cuda=[states[0], states[1]]))  # an older checkpoint's list
    assert restored == [(0, 0)]
    current["device"] = 1  # local rank 1: its own entry of the list; a list without one restores nothing
    restored.clear()
    trainutil.set_rng_state(dict(saved, cuda=[states[0], states[1]]))
    trainutil.set_rng_state(dict(saved, cuda=[states[0]]))
    assert restored == [(1, 1)]


def test_seeding_is_deterministic_and_per_rank():
    s0 = trainutil.seed_everything(7, rank=0)
    a = torch.rand(4)
    assert trainutil.seed_everything(7, rank=0) == s0
    assert torch.equal(torch.rand(4), a)
    trainutil.seed_everything(7, rank=1)
    assert not torch.equal(torch.rand(4), a)
    assert len({trainutil.rank_seed(7, r) for r in range(64)}) == 64
    assert trainutil.rank_seed(7, 0, 5) != trainutil.rank_seed(7, 0, 6)


def test_config_json_and_scalar_logger(tmp_path, no_torchrun):
    from argparse import Namespace

    path = trainutil.write_config(tmp_path, Namespace(lr=0.002, lmdb=["a", "b"], device=torch.device("cpu")),
                                  world_size=1)
    assert json.loads(open(path).read()) == {"lr": 0.002, "lmdb": ["a", "b"], "device": "cpu", "world_size": 1}
    log_dir = tmp_path / "logs"
    with trainutil.ScalarLogger(log_dir) as logger:
        logger.log(1, {"loss": torch.tensor(2.5), "lr": 0.002})
        logger.log(2, {"loss": 1.5, "lr": 0.002})
    records = trainutil.read_jsonl(log_dir / "scalars.jsonl")
    assert records == [{"step": 1, "loss": 2.5, "lr": 0.002}, {"step": 2, "loss": 1.5, "lr": 0.002}]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.5), (2, 1.5)]


def test_run_monitor_windows_speed_and_due(tmp_path, no_torchrun, monkeypatch):
    """The trainers' shared loop tail: window means, images/s over training time only (aside() left out,
    on a fake clock), due() at every k-th and the last step, one jsonl record per log."""
    clock = [100.0]
    monkeypatch.setattr(trainutil.time, "perf_counter", lambda: clock[0])
    with trainutil.RunMonitor(tmp_path, total=5, start=0, images_per_step=8, progress=False) as run:
        assert [s for s in range(1, 6) if run.due(s, 2)] == [2, 4, 5]
        for step, loss in ((1, 1.0), (2, torch.tensor(3.0))):
            clock[0] += 2.0  # two seconds of training per step
            run.update({"loss": loss, "acc": 0.5})
        with run.aside():
            clock[0] += 100.0  # a checkpoint: not training time
        assert run.means() == {"loss": 2.0, "acc": 0.5}
        written = run.log(2, {"loss/x": run.means()["loss"]})
        assert written == {"loss/x": 2.0, "speed/it_per_s": 0.5, "speed/images_per_s": 4.0}
        assert run.means() == {}  # a new window
        clock[0] += 1.0
        run.update({"loss": 7.0})
        run.log(3, run.means())
    records = trainutil.read_jsonl(tmp_path / "logs" / "scalars.jsonl")
    assert records == [{"step": 2, **written}, {"step": 3, "loss": 7.0, "speed/it_per_s": 1.0, "speed/images_per_s": 8.0}]


def test_a_resumed_run_logs_each_step_once_and_sets_later_checkpoints_aside(tmp_path, no_torchrun, monkeypatch):
    """A run resumed from step 2 after the first run had logged to step 4 and saved steps 2 and 4: the
    records of steps 3-4 are dropped (jsonl and TensorBoard), and 000004.pt, which --resume latest would
    otherwise pick after a crash of the new run, moves to checkpoints/superseded/."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    manager = trainutil.CheckpointManager(tmp_path, keep=5)
    # what a first run killed mid-save (SIGKILL) leaves: the next run's start removes it, rank 0 only
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    space = fileio.process_space()
    killed = [tmp_path / f".style_encoder.pt.tmp-{space}-{gone.pid}-0123abcd.pt",
              tmp_path / "checkpoints" / f".000006.pt.tmp-{space}-{gone.pid}-4567cdef.pt"]
    for path in killed:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half")
    with monkeypatch.context() as other_rank:
        other_rank.setattr(trainutil, "is_main", lambda: False)
        trainutil.RunMonitor(tmp_path, total=4, start=0, images_per_step=1, progress=False).close()
    assert all(path.exists() for path in killed)
    with trainutil.RunMonitor(tmp_path, total=4, start=0, images_per_step=1, progress=False) as run:
        assert not any(path.exists() for path in killed)
        for step in range(1, 5):
            run.log(step, {"loss": float(step)})
            if step % 2 == 0:
                manager.save(step, {"step": step})
    with trainutil.RunMonitor(tmp_path, total=4, start=2, images_per_step=1, progress=False) as run:
        assert manager.latest().endswith("000002.pt")
        assert os.listdir(tmp_path / "checkpoints" / "superseded") == ["000004.pt"]
        for step in (3, 4):
            run.log(step, {"loss": 10.0 * step})
    records = trainutil.read_jsonl(tmp_path / "logs" / "scalars.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    events = EventAccumulator(str(tmp_path / "logs"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    (aside,) = os.listdir(tmp_path / "logs" / "superseded")  # the first run's steps 3-4: kept, not lost
    old = trainutil.read_jsonl(tmp_path / "logs" / "superseded" / aside)
    assert [(r["step"], r["loss"]) for r in old] == [(3, 3.0), (4, 4.0)]


def test_a_torn_log_line_does_not_stop_the_next_start(tmp_path, no_torchrun):
    """A run killed in the middle of a write leaves half a line: the next start moves it aside instead of
    failing on it."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (log_dir / "scalars.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    with trainutil.ScalarLogger(log_dir, start=1) as logger:
        logger.log(2, {"loss": 2.5})
    assert trainutil.read_jsonl(log_dir / "scalars.jsonl") == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.5}]
    (aside,) = os.listdir(log_dir / "superseded")
    assert (log_dir / "superseded" / aside).read_text() == '{"step": 2, "lo\n'


def test_resumed_optimizer_keeps_its_moments_and_takes_this_runs_hyperparameters():
    """load_optimizer_state: Adam's moments and step come from the checkpoint, lr and betas from the
    optimizer as this run built it; the next step equals a step of the old optimizer with the new lr."""
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    old = torch.optim.Adam([w], lr=0.1, betas=(0.0, 0.99))
    for _ in range(3):
        old.zero_grad()
        (w ** 2).sum().backward()
        old.step()
    state = copy.deepcopy(old.state_dict())  # as from a file: not the tensors the old optimizer updates in place
    w2 = nn.Parameter(w.detach().clone())
    new = torch.optim.Adam([w2], lr=0.01, betas=(0.5, 0.9))
    assert trainutil.load_optimizer_state(new, state) == ["lr 0.1 -> 0.01", "betas (0.0, 0.99) -> (0.5, 0.9)"]
    assert new.param_groups[0]["lr"] == 0.01 and new.param_groups[0]["betas"] == (0.5, 0.9)
    assert torch.equal(new.state[w2]["exp_avg_sq"], old.state[w]["exp_avg_sq"])
    for group in old.param_groups:  # the reference: the old optimizer switched to the new values by hand
        group.update(lr=0.01, betas=(0.5, 0.9))
    for opt, p in ((old, w), (new, w2)):
        opt.zero_grad()
        (p ** 2).sum().backward()
        opt.step()
    assert torch.equal(w, w2)


def test_a_disabled_scalers_state_starts_an_enabled_one_fresh():
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    enabled = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with pytest.raises(RuntimeError):
        enabled.load_state_dict(disabled.state_dict())  # what a float32 run's checkpoint did to an fp16 resume
    trainutil.load_scaler_state(enabled, disabled.state_dict())
    assert enabled.get_scale() == 1024.0
    saved = torch.amp.GradScaler("cpu", init_scale=64.0)
    saved.scale(torch.tensor(1.0))  # an fp16 run's scaler: its scale exists once used
    saved.update(32.0)
    trainutil.load_scaler_state(enabled, saved.state_dict())
    assert enabled.get_scale() == 32.0


def test_training_checkpoints_are_tagged_one_way(tmp_path):
    """checkpoint_tag / load_tagged_checkpoint: the kind is checked with the trainer's name and hint in
    the message; an alias (train.py's tag before the common one) loads as the same kind."""
    path = str(tmp_path / "a.pt")
    save_checkpoint({**trainutil.checkpoint_tag("k1", 1), "step": 3}, path)
    assert trainutil.load_tagged_checkpoint(path, "k1", "thing")["step"] == 3
    with pytest.raises(trainutil.CheckpointError, match=r"a.pt: not a other trainer checkpoint \(kind 'k1', "
                                                        r"expected 'k2'\); use --x"):
        trainutil.load_tagged_checkpoint(path, "k2", "other trainer", "; use --x")
    old = str(tmp_path / "old.pt")
    save_checkpoint({"format": "blendgan-train-1", "step": 4}, old)
    assert trainutil.load_tagged_checkpoint(old, "k2", "x", aliases=(("format", "blendgan-train-1"),))["step"] == 4
    with pytest.raises(trainutil.CheckpointError, match="kind None"):
        trainutil.load_tagged_checkpoint(old, "k2", "x")


def test_scalar_logger_is_silent_off_rank_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with trainutil.ScalarLogger(tmp_path / "logs") as logger:
        logger.log(1, {"loss": 1.0})
    assert not (tmp_path / "logs").exists()
    assert trainutil.write_config(tmp_path, {"a": 1}) is None and not (tmp_path / "config.json").exists()


def test_check_finite():
    trainutil.check_finite({"loss": torch.tensor(1.0), "acc": 0.5}, step=3)
    with pytest.raises(trainutil.NonFiniteLossError, match=r"step 7: loss 'loss' is nan.*--resume /x/000005.pt"):
        trainutil.check_finite({"loss": torch.tensor(float("nan"))}, step=7, last_checkpoint="/x/000005.pt")
    with pytest.raises(trainutil.NonFiniteLossError, match="inf.*no checkpoint"):
        trainutil.check_finite({"loss": float("inf")}, step=1)


def test_accumulate_is_an_exponential_moving_average():
    torch.manual_seed(0)
    model, ema = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)), nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    trainutil.accumulate(ema, model, decay=0.9)
    for name, p in model.named_parameters():
        assert torch.allclose(ema.get_parameter(name), 0.9 * before[name] + 0.1 * p, atol=1e-7)
    # skip: parameters under a prefix stay as they are; decay 0 copies the others
    frozen = {k: v.clone() for k, v in ema.state_dict().items()}
    trainutil.accumulate(ema, model, decay=0.0, skip=("1.",))
    for name, p in model.named_parameters():
        assert torch.equal(ema.get_parameter(name), frozen[name] if name.startswith("1.") else p)
    with pytest.raises(ValueError):
        trainutil.accumulate(nn.Linear(3, 2, bias=False), nn.Linear(3, 2))


def test_default_device():
    assert trainutil.default_device() == ("cuda" if torch.cuda.is_available() else "cpu")


def test_each_rank_restores_its_own_rng_state_and_another_world_reseeds_per_rank(monkeypatch):
    """After a resume each rank continues its own random streams (not rank 0's: the same codes, noise and flips on
    every rank); a checkpoint of another world size re-seeds each rank with rank_seed(seed, rank)."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    states = []
    for r in range(3):
        trainutil.seed_everything(100, r)
        states.append(trainutil.rng_state())
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert trainutil.restore_rng_states(states[:2])
    got = _draws()
    trainutil.set_rng_state(states[1])
    assert _draws() == got
    trainutil.set_rng_state(states[0])
    assert _draws() != got
    assert not trainutil.restore_rng_states(states, seed=9)  # three processes wrote it: re-seeded
    got = _draws()
    trainutil.seed_everything(9, 1)
    assert _draws() == got


def test_a_local_rank_past_the_visible_gpus_is_one_clear_error(monkeypatch):
    """LOCAL_RANK 2 with 2 visible GPUs (cuda:0, cuda:1) is named before torch's own error."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    with pytest.raises(RuntimeError, match="LOCAL_RANK 2 but only 2 CUDA devices"):
        distributed.init_distributed("cuda")
    assert not torch.distributed.is_initialized()
