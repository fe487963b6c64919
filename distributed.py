"""Multi-process training helpers: everything that knows about torch.distributed lives here.

Processes are started by torchrun, which sets RANK, LOCAL_RANK and WORLD_SIZE (and MASTER_ADDR/PORT);
a plain ``python script.py`` has none of them and runs as rank 0 of a world of 1. Every function is a
no-op (or the identity) on one process, so training code calls them unconditionally:

    device = init_distributed(options.device)   # cuda:LOCAL_RANK under torchrun with CUDA
    ...
    if is_main():                                # the one guard for all file output
        save(...)
    stats = reduce_dict({"loss": loss.detach()})  # mean over ranks, for logging only
    cleanup()

Nothing happens at import.
"""
import datetime
import os

import torch
import torch.distributed as dist


def _env_int(name, default):
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def get_rank():
    """Global rank: the process group's once initialised, else torchrun's RANK (0 without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def get_local_rank():
    """Rank within this node (torchrun's LOCAL_RANK), which selects the GPU; 0 without torchrun."""
    return _env_int("LOCAL_RANK", 0)


def get_world_size():
    """Number of processes: the process group's once initialised, else torchrun's WORLD_SIZE (1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def is_distributed():
    """True when a process group is running: torchrun's, with more than one process (init_distributed
    makes none for one), or one its caller made (tools/gpu_check.py's one-process NCCL run of DDP)."""
    return dist.is_available() and dist.is_initialized()


def is_main():
    """Rank 0: the only process that writes files, logs and shows progress bars."""
    return get_rank() == 0


def init_distributed(device, timeout_minutes=30):
    """Join torchrun's process group (nccl for CUDA, gloo for CPU) and return this process's device.

    device: "cuda", "cuda:N", "cpu" or a torch.device. Under torchrun with CUDA each process takes
    cuda:LOCAL_RANK (an explicit index in ``device`` is replaced: one GPU per process). Without
    torchrun (WORLD_SIZE unset or 1) nothing is initialised and ``torch.device(device)`` is returned,
    unless the caller has already made a process group: then that group is used, on cuda:LOCAL_RANK
    when LOCAL_RANK is set, else on the device given (a launcher of its own chose it).
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1 and not is_distributed():
        if device.type == "cuda" and device.index is not None:
            # cuda:N the current device, so that calls without a device (synchronize, memory stats,
            # the CUDA ops' self-check, pin_memory) mean this one and not cuda:0
            torch.cuda.set_device(device)
        return device
    if device.type == "cuda":
        if os.environ.get("LOCAL_RANK", "") != "" or device.index is None:
            local_rank = get_local_rank()
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices "
                                   "are visible: start at most that many processes per node")
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
    return device


def barrier():
    """Wait for every rank (no-op on one process)."""
    if is_distributed():
        dist.barrier()


def reduce_mean(tensor):
    """Mean of ``tensor`` over ranks, for logging (a detached copy; the input is left alone).

    A synchronisation point: every rank must call it, in the same order.
    """
    tensor = tensor.detach().clone()
    if not is_distributed():
        return tensor
    home = tensor.device
    if dist.get_backend() == "nccl" and home.type != "cuda":  # nccl reduces GPU tensors only
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return (tensor / dist.get_world_size()).to(home)


def reduce_dict(stats):
    """{name: scalar tensor or number} -> {name: float}, each the mean over ranks (one all_reduce).

    Every rank must call it with the same keys. Used for logging; returns Python floats.
    """
    if not stats:
        return {}
    names = sorted(stats)
    values = []
    device = None
    for name in names:
        v = stats[name]
        if torch.is_tensor(v):
            device = v.device
            values.append(v.detach().float().reshape(()))
        else:
            values.append(torch.tensor(float(v)))
    device = device or torch.device("cpu")
    packed = torch.stack([v.to(device) for v in values])  # [K]
    packed = reduce_mean(packed)
    return dict(zip(names, packed.tolist()))


def all_gather_with_grad(x):
    """Concatenate ``x`` [B, ...] from all ranks along dim 0 -> [world_size * B, ...], in rank order.

    The other ranks' parts are plain copies; this rank's part IS ``x`` and keeps its gradient. So a
    loss computed identically on every rank from the gathered tensor gives each rank the exact
    partial derivative for its own samples; DDP then averages gradients over ranks, so multiply such
    a loss by ``get_world_size()`` before backward to get the single-process gradient of the global
    batch. Every rank must pass the same shape. Identity on one process.
    """
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] on one process)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def unwrap(model):
    """The module inside a DistributedDataParallel (or DataParallel) wrapper; the model itself otherwise."""
    return getattr(model, "module", model)


def cleanup():
    """Leave the process group (no-op if none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
