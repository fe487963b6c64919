"""checkpoint.py, the one safe loader: files rosinality/stylegan2-pytorch's train.py writes load (their
``args`` is an argparse.Namespace) and start G, g_ema and D_face; pickles that call a function are refused
with a plain one-line message naming the file and the global.
"""
import argparse
import errno
import os
import subprocess
from types import SimpleNamespace

import pytest
import torch

import blendgan_training as bt
import checkpoint
import model
import trainutil
from checkpoint import SAFE_CLASSES, CheckpointError, DiskFullError, load_checkpoint, save_checkpoint
from conftest import synthesis_only

SIZE = 8
STYLE_DIM = 16
NARROW = {4: 512, 8: 32}


@pytest.fixture(autouse=True)
def narrow(monkeypatch):
    """Thin networks (the 4x4 layers keep their 512 channels), one thread: the machine is shared."""
    monkeypatch.setattr(model, "stylegan2_channels", lambda channel_multiplier: dict(NARROW))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class RunsCode:
    """Unpickling this calls ``os.system`` (what a malicious checkpoint does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def rosinality_args(path):
    """The Namespace rosinality's train.py builds (parser defaults plus the fields it sets itself)."""
    return argparse.Namespace(path=path, arch="stylegan2", iter=800000, batch=16, n_sample=64, size=SIZE, r1=10.0,
                              path_regularize=2.0, path_batch_shrink=2, d_reg_every=16, g_reg_every=4, mixing=0.9,
                              ckpt=None, lr=0.002, channel_multiplier=2, wandb=False, local_rank=0, augment=False,
                              augment_p=0.0, ada_target=0.6, ada_length=500000, ada_every=256, distributed=False,
                              latent=STYLE_DIM, n_mlp=2, start_iter=0)


def optimizer_state(module):
    """An Adam state dict after one step (with per-parameter moments), as rosinality's g_optim/d_optim."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.002, betas=(0.0, 0.99))
    sum(p.square().sum() for p in params).backward()
    opt.step()
    module.zero_grad(set_to_none=True)
    return opt.state_dict()


def save_rosinality_training_file(path):
    """A file saved the way rosinality's train.py saves one: plain torch.save of the dict with a Namespace.

    Its generators are StyleGAN2 generators: no style encoder, style mapping or WBM weights.
    """
    torch.manual_seed(21)
    g = model.Generator(SIZE, STYLE_DIM, 2, load_pretrained_vgg=False, style_pool_size=32)
    torch.manual_seed(22)
    g_ema = model.Generator(SIZE, STYLE_DIM, 2, load_pretrained_vgg=False, style_pool_size=32)
    torch.manual_seed(23)
    d = model.Discriminator(SIZE)
    ckpt = {"g": synthesis_only(g), "d": d.state_dict(), "g_ema": synthesis_only(g_ema),
            "g_optim": optimizer_state(g), "d_optim": optimizer_state(d), "args": rosinality_args("lmdb/ffhq"),
            "ada_aug_p": 0.0}
    torch.save(ckpt, path)
    return ckpt


def test_rosinality_training_file_starts_g_g_ema_and_d_face(tmp_path):
    path = str(tmp_path / "010000.pt")
    saved = save_rosinality_training_file(path)
    loaded = load_checkpoint(path)
    assert isinstance(loaded["args"], argparse.Namespace) and vars(loaded["args"]) == vars(saved["args"])
    assert loaded["ada_aug_p"] == 0.0
    assert loaded["g_optim"]["param_groups"][0]["betas"] == (0.0, 0.99)

    opts = SimpleNamespace(size=SIZE, style_dim=STYLE_DIM, n_mlp=2, channel_multiplier=1, style_pool_size=32)
    torch.manual_seed(5)
    nets = bt.build_networks(opts, "cpu")
    fresh_embedding = {k: v.clone() for k, v in nets.g.embedding.state_dict().items()}
    messages = []
    bt.load_stylegan2(nets, path, messages.append)

    for own, part in ((nets.g, "g"), (nets.g_ema, "g_ema"), (nets.d_face, "d")):
        sd = own.state_dict()
        assert saved[part], part
        for k, v in saved[part].items():
            assert torch.equal(sd[k], v), f"{part}.{k} does not start from the file"
    # g and g_ema came from their own entries (the file's two generators differ)
    assert not torch.equal(nets.g.style[1].weight, nets.g_ema.style[1].weight)
    for k, v in fresh_embedding.items():  # the style mapping is not in the file: fresh and the same in both
        assert torch.equal(nets.g.embedding.state_dict()[k], v)
        assert torch.equal(nets.g_ema.embedding.state_dict()[k], v)
    assert any(path in m for m in messages)


def check_refusal(path, global_name):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    message = str(e.value)
    assert path in message and global_name in message
    assert "\x1b" not in message and "\n" not in message
    assert "weights_only=False" not in message.replace(" ", "") and "weights_only" not in message
    return message


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_that_calls_a_function_is_refused(tmp_path, legacy):
    marker = tmp_path / "ran"
    path = str(tmp_path / "evil.pt")
    # Inside a Namespace and beside real training entries: allowing Namespace opens no way to run code.
    payload = {"g": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.002, hook=RunsCode(marker))}
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    message = check_refusal(path, f"{os.system.__module__}.system")
    assert "argparse.Namespace" not in message.split("global", 1)[1].split(",")[0]  # not blamed: it is allowed
    assert not marker.exists()


def test_unknown_class_is_refused_by_name(tmp_path):
    path = str(tmp_path / "obj.pt")
    torch.save({"opts": SimpleNamespace(lr=0.1)}, path)
    check_refusal(path, "types.SimpleNamespace")


def test_only_plain_data_classes_are_allowed():
    """Every allowed class is one whose unpickling only sets attributes: no __reduce__ / __setstate__ of its own."""
    assert SAFE_CLASSES == (argparse.Namespace,)
    for cls in SAFE_CLASSES:
        assert cls.__reduce__ is object.__reduce__ and cls.__reduce_ex__ is object.__reduce_ex__
        assert not hasattr(cls, "__setstate__")


# a file with keys the model lacks is one CheckpointError naming the first three and counting the rest
def test_unexpected_keys_are_one_line_naming_the_file_and_the_keys():
    module = torch.nn.Linear(3, 2)
    sd = {**module.state_dict(), "head.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_state_dict_strict(module, sd, "file.pt['g_ema']")
    assert str(e.value) == "file.pt['g_ema']: layout does not fit Linear: 1 unexpected: head.weight"
    sd = {**module.state_dict(), **{f"head.{i}": torch.zeros(1) for i in range(5)}}
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_state_dict_strict(module, sd, "file.pt")
    assert str(e.value) == "file.pt: layout does not fit Linear: 5 unexpected: head.0, head.1, head.2 (+2 more)"


# a missing entry names the file and the entries it has; an empty file says it is empty
def test_missing_entry_and_empty_file_are_named(tmp_path):
    path = str(tmp_path / "psp_encoder.pt")
    save_checkpoint({"state_dict": {}, "opts": {}}, path)
    with pytest.raises(CheckpointError) as e:
        checkpoint.require_key(load_checkpoint(path), "g_ema", path)
    assert str(e.value) == f"checkpoint {path}: has no 'g_ema' entry (it has: opts, state_dict)"
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(empty)
    assert str(e.value) == f"checkpoint {empty}: file is empty"


def test_files_that_are_not_checkpoints_say_what_they_are(tmp_path):
    """A page saved instead of the weights (Drive's quota page: the known failure of a hand download) and
    random bytes are named as such, not as something the safe loader refused; a truncated zip is still
    'truncated or corrupt', and real files of both torch.save formats load."""
    page = tmp_path / "blendgan.pt"
    page.write_bytes(b"<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head></html>")
    with pytest.raises(CheckpointError, match=r"blendgan.pt: an HTML page \('Google Drive - Quota exceeded'\), "
                                              r"not weights.*download it again"):
        load_checkpoint(page)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(bytes(range(7, 107)))
    with pytest.raises(CheckpointError, match="noise.pt: not a PyTorch checkpoint"):
        load_checkpoint(noise)
    whole = tmp_path / "whole.pt"
    torch.save({"w": torch.arange(3)}, whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cut.pt: not a readable PyTorch checkpoint, truncated or corrupt"):
        load_checkpoint(cut)
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(3), "note": "<html> in a string"}, legacy, _use_new_zipfile_serialization=False)
    for path in (whole, legacy):  # (a legacy file's pickle holds its strings in its first bytes)
        assert torch.equal(load_checkpoint(path)["w"], torch.arange(3))


def test_a_full_disk_is_named_and_the_earlier_checkpoint_stays(small_disk, capsys):
    """torch's words for a full disk are 'unexpected pos ...': the error says the disk is full, the file written
    before stays whole and no temporary is left; a trainer ends with that one line and exit code 1."""
    path = small_disk / "000001.pt"
    save_checkpoint({"w": torch.arange(1000)}, path)
    big = {"w": torch.zeros(2 * 2**18), "step": 2}  # 2 MiB of float32
    with pytest.raises(DiskFullError, match=rf"cannot write {path}: the disk is full \((0|1) MiB free in "
                                            rf"{small_disk}, the checkpoint takes 2 MiB\); the files written "
                                            rf"before it are intact"):
        save_checkpoint(big, path)
    assert os.listdir(small_disk) == ["000001.pt"]
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(1000))
    assert trainutil.run_trainer(lambda options: save_checkpoint(big, small_disk / "000002.pt"), None,
                                 lambda result: "done") == 1
    assert capsys.readouterr().err.startswith(f"error: cannot write {small_disk / '000002.pt'}: the disk is full")
    assert os.listdir(small_disk) == ["000001.pt"]


@pytest.mark.parametrize("free", [None, 32])
def test_other_write_failures_keep_their_own_error(free, tmp_path, monkeypatch):
    """With room on the disk a failed write is not called a full disk: torch's error comes out as it is; also when
    the room is exactly the checkpoint's tensors (32 bytes here)."""
    def failing_save(obj, f):
        f.write(b"PK partial")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    if free is not None:
        monkeypatch.setattr(checkpoint.fileio, "free_bytes", lambda path: free)
    with pytest.raises(RuntimeError, match="failed writing file data/0") as failure:
        save_checkpoint({"w": torch.zeros(8)}, tmp_path / "ck.pt")
    assert not isinstance(failure.value, DiskFullError)
    assert os.listdir(tmp_path) == []


def test_tensor_bytes_counts_each_dtype_in_nested_containers():
    """The size a full-disk message and the trainers' room warning give: every tensor's bytes at its own dtype,
    in dicts, lists and tuples; numbers and strings count nothing."""
    state = {"g": {"w": torch.zeros(4, dtype=torch.bfloat16)}, "queue": [torch.zeros(3, dtype=torch.int64)],
             "rng": (torch.zeros(5, dtype=torch.uint8), 7), "args": {"name": "x", "lr": 0.002}}
    assert checkpoint.tensor_bytes(state) == 4 * 2 + 3 * 8 + 5


def test_no_room_for_the_checkpoints_folder_is_a_full_disk_and_a_read_only_disk_is_not(small_disk):
    """A full disk can refuse the folder itself (the first save makes checkpoints/); an OSError that is not about
    space (a disk remounted read-only after an I/O error) keeps its own words, even when the checkpoint is larger
    than the free space."""
    big = {"w": torch.zeros(2 * 2**18)}  # 2 MiB of float32
    path = small_disk / "run" / "checkpoints" / "000001.pt"
    subprocess.run(["mount", "-o", "remount,nr_inodes=1", str(small_disk)], check=True)  # no inode for a folder
    with pytest.raises(DiskFullError, match=rf"^cannot write {path}: the disk is full \(1 MiB free in "
                                            rf"{path.parent}, the checkpoint takes 2 MiB\)"):
        save_checkpoint(big, path)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(OSError) as failure:
        save_checkpoint(big, small_disk / "000001.pt")
    assert failure.value.errno == errno.EROFS and not isinstance(failure.value, DiskFullError)
