"""One prepared GPU check (issue #14, part 3): every GPU measurement and GPU-only test in one run, one
report (report.md + report.json) in the folder given.

    python tools/gpu_check.py OUT_DIR             # on a GPU machine: <= 8 minutes on one modern GPU
    python tools/gpu_check.py OUT_DIR --cpu-tiny  # every step on the CPU at tiny size (what the test runs)

Steps (each in its own subprocess with a time limit; a failing or timed-out step is reported and the
run goes on; the GPU limits add up to 8 minutes; the report is rewritten after every step, so a run
killed from outside keeps the steps it finished):
  build       builds the CUDA extensions (op/build.py, nvcc; one process per extension, at once) and runs
              their self-check, so that no later step pays the build inside its own limit; if it fails,
              the later steps use the reference ops; skipped on the CPU
  op_check    op/check_cuda.py (CUDA kernels vs the PyTorch reference: forward, grad, gradgrad,
              gradcheck, float16/bfloat16, contiguous and channels_last, one 67M-output case, a small G
              and D with the kernels vs the reference ops) and the GPU-only test of tests/test_op.py
              that check_cuda does not repeat; CPU mode: the build self-check logic with reference kernels
              standing in for the extension
  op_speed    CUDA kernels vs the reference path, forward + backward (check_cuda --bench-only)
  bench_g     bench.py: G at 1024 px, batch 1 and 16, float16 / bfloat16 / float32 eager; the full
              style-transfer pair; images/s; peak memory
  transfer_4gb  style_transfer_folder.py at 1024 px in float16 under a 4 GB CUDA memory cap
              (torch.cuda.set_per_process_memory_fraction), the release's issue #16
  train       bench.py --train at 256 px (batch 2) and 1024 px (batch 4), in float32 and in bfloat16
              (train.py's --amp); the style-encoder SimCLR step at batch 64
  ddp         train.py for a few iterations at 256 px under torchrun, 1 process, in a process group made
              by a small driver (NCCL on the GPU, gloo on the CPU) so that DDP really wraps the networks
              (train.py alone makes no process group for a world of one)
  bench_compile  bench.py --compile: G at the largest batch in bfloat16 (GPU only; last, as a cold
              compile may use its whole limit)
The paper's numbers for comparison: 4.6 images/s BlendGAN training on 4 V100s, ~210 images/s for the
style encoder.
"""
import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = {"BlendGAN training, 4 V100 (images/s)": 4.6, "style encoder training (images/s)": 210}

# Per-mode sizes and limits (seconds). GPU: the limits add up to 480 s, so the whole check ends within
# 8 minutes (plus ~20 s outside the limits: checkpoints and LMDBs made here). The compiled G run comes
# last: on a cold compile cache it may not print a row in its time, and then nothing else is lost.
# H200, 2026-11-28 (session 5): the first build 51 s with the two extensions one after the other (now at
# once: about the longer of the two, hence 50 s); check_cuda ~14 s (+~3 s since: half precision, one
# 67M-output case; +~5 s: channels_last rows, the G and D row, which builds a small G on the CPU first);
# one bench.py process at 1024 px ~15-60 s, of which ~6 s per network set (now built once per size and
# dtype, not per batch); one training configuration at 1024 px ~30 s; the transfer step 26 s; the DDP run
# 78 s with style_dim 512 (the step now uses 64). Not yet measured there: torch.compile of G. A killed
# bench.py keeps the rows it printed before.
GPU = dict(size=1024, batches=(1, 16), dtypes=("float16", "bfloat16", "float32"), compile=True,
           train=((256, 2), (1024, 4)), simclr_batch=64, ddp_size=256, ddp_iter=5, repeat=3,
           limits=dict(build=50, op_check=55, op_speed=20, bench_g=85, transfer_4gb=35, train=100, ddp=65,
                       bench_compile=70))
CPU_TINY = dict(size=32, batches=(1, 2), dtypes=("float32", "bfloat16"), compile=False,
                train=((32, 2),), simclr_batch=2, ddp_size=32, ddp_iter=2, repeat=1,
                limits=dict(build=0, op_check=120, op_speed=60, bench_g=600, transfer_4gb=300, train=900, ddp=300,
                            bench_compile=0))
CUDA_EXTENSIONS = ("upfirdn2d", "fused_bias_act")
STEP_ENV = {}  # environment for every later step's processes (set by a failed build)


def run(cmd, limit, env=None):
    """(ok, seconds, output) of a subprocess run from the repository root, stopped after `limit` s.

    The command runs in its own session; a timeout stops that whole process group (stop_group), so a
    build's ninja and nvcc, or torchrun and its workers, do not outlive their step (they would hold the
    GPU or the build directory while the next step runs).
    """
    t0 = time.perf_counter()
    # The repository first, then the caller's PYTHONPATH (packages carried to a bare GPU machine live there).
    pythonpath = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    full_env = dict(os.environ, PYTHONPATH=pythonpath, **STEP_ENV, **(env or {}))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=limit)
        ok = proc.returncode == 0
        if not ok:
            out += f"\n[exit status {proc.returncode}]"
    except subprocess.TimeoutExpired:
        out = stop_group(proc) + f"\n[killed after {limit:.0f} s]"
        ok = False
    finally:
        signal_group(proc, signal.SIGKILL)  # whatever the step started and left (a group outlives its leader)
    return ok, time.perf_counter() - t0, out


def signal_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # the group is gone
        pass


def stop_group(proc, grace=15, last_wait=5):
    """Stops a timed-out step's process group and returns what it printed. SIGTERM first: torchrun starts its
    workers in sessions of their own, out of the group's reach, and stops them on SIGTERM (after SIGKILL
    they would run on, holding the GPU and this pipe); then SIGKILL after `grace` s. A process still holding
    the pipe `last_wait` s later is not waited for."""
    so_far = ""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, last_wait)):
        signal_group(proc, sig)
        try:
            return proc.communicate(timeout=wait)[0]  # all of it: a retried communicate loses nothing
        except subprocess.TimeoutExpired as err:  # all output so far, as bytes whatever text=True says
            so_far = err.output.decode(errors="replace") if isinstance(err.output, bytes) else (err.output or "")
    proc.stdout.close()
    return so_far


def table_rows(text):
    """The `| size | dtype | batch | what | median s | images/s |` rows bench.py prints, as dicts."""
    rows = []
    for line in text.splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|\s*(\w+)\s*\|\s*(\d+)\s*\|\s*(.+?)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|$",
                     line.strip())
        if m:
            rows.append(dict(size=int(m[1]), dtype=m[2], batch=int(m[3]), what=m[4], seconds=float(m[5]),
                             images_per_s=float(m[6])))
    return rows


def peak_memory(text):
    """bench.py's '# peak CUDA memory X GB (size S, dtype D, batch B)' and '# peak RSS X GB' lines, as rows."""
    rows = []
    for m in re.finditer(r"# peak (CUDA memory|RSS) ([\d.]+) GB(?: \(size (\d+), dtype (\w+), batch (\d+)\))?", text):
        row = dict(what=f"peak {m[1]} (GB)", gb=float(m[2]))
        if m[3]:
            row.update(size=int(m[3]), dtype=m[4], batch=int(m[5]))
        rows.append(row)
    return rows


def step_build(cfg, device, out_dir):
    """Builds each CUDA extension in its own process, all at once (each has one .cu and one .cpp: in one
    process they would compile one after the other on a machine of many cores). If one fails, the later
    steps run with BLENDGAN_CUDA_OPS=ref instead of each paying the build again inside its own limit."""
    if device != "cuda":
        return dict(ok=True, seconds=0.0, output="skipped: no CUDA extensions are built on the CPU")
    code = ("import sys\nfrom op.build import load_extension\n"
            "load_extension(sys.argv[1], strict=True, verbose=True)  # builds, then the self-check (warns if wrong)\n"
            "print(sys.argv[1], 'built')\n")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(CUDA_EXTENSIONS)) as pool:
        results = list(pool.map(lambda name: run([sys.executable, "-c", code, name], cfg["limits"]["build"]),
                                CUDA_EXTENSIONS))
    out = "\n".join(f"--- {name}\n{text}" for name, (_, _, text) in zip(CUDA_EXTENSIONS, results))
    ok = all(r[0] for r in results) and "disagrees with the PyTorch reference" not in out
    result = dict(ok=ok, seconds=time.perf_counter() - t0, output=out)
    if not ok:
        STEP_ENV["BLENDGAN_CUDA_OPS"] = "ref"
        result["later_steps"] = "BLENDGAN_CUDA_OPS=ref (the PyTorch reference ops)"
    return result


def step_op_check(cfg, device, out_dir):
    py = sys.executable
    if device == "cuda":
        ok1, sec1, out1 = run([py, "-m", "op.check_cuda"], cfg["limits"]["op_check"] * 2 // 3)
        # the GPU-only test that check_cuda does not repeat (test_op's *_cuda_matches_ref run its comparisons)
        ok2, sec2, out2 = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "tests/test_op.py::test_cuda_auto_uses_kernels_and_half_precision"],
                              cfg["limits"]["op_check"] // 3)
        return dict(ok=ok1 and ok2, seconds=sec1 + sec2, output=out1 + "\n" + out2,
                    all_ok_line="ALL OK" in out1)
    code = ("from op.check_cuda import reference_kernels, self_check\n"
            "for name in ('upfirdn2d', 'fused_bias_act'):\n"
            "    reason = self_check(name, reference_kernels(name), 'cpu')\n"
            "    print(name, 'ok' if reason is None else reason)\n"
            "    assert reason is None\n")
    ok, sec, out = run([py, "-c", code], cfg["limits"]["op_check"])
    return dict(ok=ok, seconds=sec, output=out)


def step_op_speed(cfg, device, out_dir):
    py = sys.executable
    if device == "cuda":
        ok, sec, out = run([py, "-m", "op.check_cuda", "--bench-only"], cfg["limits"]["op_speed"])
    else:
        code = "from op.check_cuda import _benchmark\nfor r in _benchmark('cpu', (1, 8, 32, 32), 2): print(r)"
        ok, sec, out = run([py, "-c", code], cfg["limits"]["op_speed"])
    return dict(ok=ok, seconds=sec, output=out)


def bench_run(args, limit, device, compile=False):
    """Runs bench.py with the extra arguments `args` within `limit` s; its table rows and peak-memory rows,
    tagged with compile."""
    cmd = [sys.executable, "bench.py", *args, "--device", device, "--warmup", "1"] + (["--compile"] if compile else [])
    ok, sec, out = run(cmd, limit)
    rows = [dict(r, compile=compile) for r in table_rows(out) + peak_memory(out)]
    return dict(ok=ok, seconds=sec, rows=rows, output=f"$ {' '.join(cmd[1:])}\n{out}")


def bench_g_args(cfg):
    return ["--sizes", str(cfg["size"]), "--repeat", str(cfg["repeat"])]


def step_bench_g(cfg, device, out_dir):
    """Every batch x dtype in one eager bench.py process, with the style-transfer pair."""
    args = bench_g_args(cfg) + ["--batch", ",".join(map(str, cfg["batches"])), "--dtype", ",".join(cfg["dtypes"])]
    return bench_run(args, cfg["limits"]["bench_g"], device)


def step_bench_compile(cfg, device, out_dir):
    """The largest batch in bfloat16 under --compile (GPU only: the CPU rehearsal has no compiler time)."""
    if not cfg["compile"]:
        return dict(ok=True, seconds=0.0, output="skipped: --compile is timed on the GPU only")
    args = bench_g_args(cfg) + ["--batch", str(cfg["batches"][-1]), "--dtype", "bfloat16", "--no_psp"]
    return bench_run(args, cfg["limits"]["bench_compile"], device, compile=True)


@contextlib.contextmanager
def scratch_folder():
    """A temporary folder outside the report's (a step's checkpoints are 2.5 GB at 1024 px), removed however
    the step ends."""
    work = tempfile.mkdtemp(prefix="gpu_check_")
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def make_checkpoints(size, folder):
    """Release-layout blendgan.pt and psp_encoder.pt of random weights at `size` (the release's sizes at
    1024 px)."""
    import torch

    from checkpoint import save_checkpoint
    from model import Generator
    from psp_encoder.psp_encoders import PSPEncoder, psp_state_dict_for_release

    torch.manual_seed(0)
    g = Generator(size, 512, 8, channel_multiplier=2, load_pretrained_vgg=False)
    latent_avg = g.mean_latent(256).detach()
    save_checkpoint({"g_ema": g.state_dict(), "latent_avg": latent_avg}, os.path.join(folder, "blendgan.pt"))
    del g
    psp = PSPEncoder(None, output_size=size)
    save_checkpoint(psp_state_dict_for_release(psp), os.path.join(folder, "psp_encoder.pt"))


TRANSFER_DRIVER = """
import sys, torch, json
sys.argv = ["style_transfer_folder.py"] + sys.argv[1:]
import style_transfer_folder
from inference import keep_freed_memory
keep_freed_memory()
cap = None
if torch.cuda.is_available():
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 4 * 1024 ** 3 / total))
    cap = 4.0
code = style_transfer_folder.main(sys.argv[1:])
peak = torch.cuda.max_memory_allocated() / 1024 ** 3 if torch.cuda.is_available() else None
print("TRANSFER " + json.dumps({"exit": code, "cap_gb": cap, "peak_gb": peak}))
sys.exit(code)
"""


def step_transfer_4gb(cfg, device, out_dir):
    with scratch_folder() as work:
        return transfer_4gb(cfg, device, work)


def transfer_4gb(cfg, device, work):
    t0 = time.perf_counter()
    make_checkpoints(cfg["size"], work)
    faces, styles = os.path.join(work, "faces"), os.path.join(work, "styles")
    for src, dst in ((os.path.join(ROOT, "test_imgs", "face_imgs"), faces),
                     (os.path.join(ROOT, "test_imgs", "style_imgs"), styles)):
        os.makedirs(dst, exist_ok=True)
        for name in sorted(os.listdir(src))[:2]:
            shutil.copy(os.path.join(src, name), dst)
    dtype = "float16" if device == "cuda" else "float32"
    ok, sec, out = run([sys.executable, "-c", TRANSFER_DRIVER, "--size", str(cfg["size"]), "--ckpt",
                        os.path.join(work, "blendgan.pt"), "--psp_encoder_ckpt", os.path.join(work, "psp_encoder.pt"),
                        "--input_img_path", faces, "--style_img_path", styles, "--outdir", os.path.join(work, "out"),
                        "--device", device, "--dtype", dtype], cfg["limits"]["transfer_4gb"])
    m = re.search(r"TRANSFER (\{.*\})", out)
    result = json.loads(m[1]) if m else {}
    written = sorted(os.listdir(os.path.join(work, "out"))) if os.path.isdir(os.path.join(work, "out")) else []
    return dict(ok=ok and len(written) == 4, seconds=time.perf_counter() - t0, dtype=dtype,
                outputs_written=len(written), **result, output=out)


def step_train(cfg, device, out_dir):
    """bench.py --train: every (size, batch) of cfg["train"] in float32 and under --amp (bfloat16), the
    SimCLR step at its own batch, in one process."""
    sizes, batches = zip(*cfg["train"])
    args = ["--sizes", "", "--train", "--train_size", ",".join(map(str, sizes)), "--train_batch",
            ",".join(map(str, batches)), "--simclr_batch", str(cfg["simclr_batch"]), "--dtype", "float32,bfloat16",
            "--repeat", str(cfg["repeat"])]
    return bench_run(args, cfg["limits"]["train"], device)


DDP_DRIVER = """
import sys, torch, torch.distributed as dist
if sys.argv[1] == "cuda":
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
else:
    dist.init_process_group("gloo")
print("DDP_GROUP", dist.get_backend(), dist.get_world_size(), flush=True)
import blendgan_training, train
wrap = blendgan_training.wrap_ddp
def wrap_and_say(*args, **kwargs):
    wrapped = wrap(*args, **kwargs)
    print("DDP_WRAPPED", type(wrapped[0]).__name__, flush=True)
    return wrapped
blendgan_training.wrap_ddp = wrap_and_say
sys.exit(train.main(sys.argv[2:]))
"""


def step_ddp(cfg, device, out_dir):
    with scratch_folder() as work:
        return ddp(cfg, device, work)


def ddp(cfg, device, work):
    """train.py under torchrun in a one-process group made by DDP_DRIVER (train.py makes none for a world
    of one), so that the networks are really wrapped in DDP and the collectives run on NCCL."""
    import prepare_data

    t0 = time.perf_counter()
    lmdbs = []
    for name, folder in (("faces", "face_imgs"), ("styles", "style_imgs")):
        path = os.path.join(work, name)
        prepare_data.prepare(prepare_data.PrepareOptions(out=path, paths=[os.path.join(ROOT, "test_imgs", folder)],
                                                         size=(cfg["ddp_size"],), n_worker=0, format="png"))
        lmdbs.append(path)
    import torch

    from checkpoint import save_checkpoint
    from style_encoder import StyleEncoder

    style_dim = 64  # the 610,304 x style_dim Gram layer is not what this step checks (1.25 GB at 512)
    small = [] if device == "cuda" else ["--n_mlp", "2", "--channel_multiplier", "1", "--style_pool_size", "32"]
    encoder_ckpt = os.path.join(work, "style_encoder.pt")
    torch.manual_seed(0)
    save_checkpoint({"style_encoder": StyleEncoder(style_dim, load_pretrained_vgg=False).state_dict()}, encoder_ckpt)
    small += ["--style_dim", str(style_dim), "--style_encoder_ckpt", encoder_ckpt]
    driver = os.path.join(work, "ddp_driver.py")
    with open(driver, "w") as f:
        f.write(DDP_DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", driver, device,
           *lmdbs, "--out_dir", os.path.join(work, "run"), "--size", str(cfg["ddp_size"]), "--batch", "2", "--iter", str(cfg["ddp_iter"]), "--device", device, "--num_workers", "0", "--no_progress",
           "--from_scratch", "--log_every", "1", "--sample_every", "1000", "--save_every", "1000", *small]
    ok, sec, out = run(cmd, cfg["limits"]["ddp"], env={"OMP_NUM_THREADS": "1"})
    warnings_seen = [w for w in ("Grad strides do not match bucket view strides", "broadcast_buffers` is deprecated")
                     if w in out]
    group = re.search(r"DDP_GROUP (\w+) (\d+)", out)
    wrapped = re.search(r"DDP_WRAPPED (\w+)", out)
    return dict(ok=ok and not warnings_seen and bool(group) and bool(wrapped), seconds=time.perf_counter() - t0,
                backend=group[1] if group else None, wrapped_in=wrapped[1] if wrapped else None,
                ddp_warnings=warnings_seen, output=out)


STEPS = [("build", step_build), ("op_check", step_op_check), ("op_speed", step_op_speed), ("bench_g", step_bench_g),
         ("transfer_4gb", step_transfer_4gb), ("train", step_train), ("ddp", step_ddp),
         ("bench_compile", step_bench_compile)]


def environment(device):
    import torch

    env = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda, device=device,
               host_cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count())
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1024 ** 3, 1)
    try:
        env["load_average"] = os.getloadavg()
    except OSError:
        pass
    return env


def markdown(report):
    lines = [f"# GPU check ({report['mode']})", "",
             f"{report['started']}, {report['total_seconds']:.0f} s in all; "
             + ", ".join(f"{k} {v}" for k, v in report["environment"].items()), "",
             "| step | result | seconds |", "| --- | --- | --- |"]
    lines += [f"| {s['name']} | {'ok' if s['ok'] else 'FAILED'} | {s['seconds']:.1f} |" for s in report["steps"]]
    for s in report["steps"]:
        lines += ["", f"## {s['name']}", ""]
        extra = {k: v for k, v in s.items() if k not in ("name", "ok", "seconds", "output", "rows")}
        if extra:
            lines += [f"- {k}: {v}" for k, v in extra.items()] + [""]
        if s.get("rows"):
            all_keys = list(dict.fromkeys(k for r in s["rows"] for k in (["size"] if "size" in r else []) + list(r)))
            lines += ["| " + " | ".join(all_keys) + " |", "|" + " --- |" * len(all_keys)]
            lines += ["| " + " | ".join(str(r.get(k, "")) for k in all_keys) + " |" for r in s["rows"]]
            lines.append("")
        tail = s["output"][-3000:]
        lines += ["<details><summary>output (last 3000 characters)</summary>", "", "```", tail, "```", "</details>"]
    lines += ["", "## Paper's numbers", ""] + [f"- {k}: {v}" for k, v in PAPER.items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="folder for report.md and report.json (created)")
    p.add_argument("--cpu-tiny", dest="cpu_tiny", action="store_true",
                   help="run every step on the CPU at tiny size (the test of this script)")
    p.add_argument("--steps", default=",".join(name for name, _ in STEPS),
                   help="comma-separated subset of: " + ", ".join(name for name, _ in STEPS))
    opts = p.parse_args(argv)
    unknown = set(opts.steps.split(",")) - {name for name, _ in STEPS}
    if unknown:
        p.error(f"--steps: unknown step(s) {sorted(unknown)}")
    sys.path.insert(0, ROOT)
    import torch

    if not opts.cpu_tiny and not torch.cuda.is_available():
        p.error("no CUDA device: run with --cpu-tiny for the CPU rehearsal")
    device, cfg = ("cpu", CPU_TINY) if opts.cpu_tiny else ("cuda", GPU)
    os.makedirs(opts.out_dir, exist_ok=True)
    report = dict(mode="cpu-tiny" if opts.cpu_tiny else "gpu",
                  started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), environment=environment(device), paper=PAPER, steps=[])
    t0 = time.perf_counter()
    for name, fn in STEPS:
        if name not in opts.steps.split(","):
            continue
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            result = fn(cfg, device, opts.out_dir)
        except Exception:  # a broken step is reported, the others still run
            result = dict(ok=False, seconds=0.0, output=traceback.format_exc())
        report["steps"].append(dict(name=name, **result))
        print(f"[gpu_check] {name}: {'ok' if result['ok'] else 'FAILED'} ({result['seconds']:.1f} s)", flush=True)
        write_report(report, opts.out_dir, time.perf_counter() - t0)
    print(f"[gpu_check] report: {opts.out_dir}/report.md, report.json ({'all ok' if report['ok'] else 'FAILURES'})")
    return 0 if report["ok"] else 1


def write_report(report, out_dir, seconds):
    """report.json and report.md as they stand (after every step: a run killed from outside keeps them)."""
    from fileio import atomic_path

    report["total_seconds"] = seconds
    report["ok"] = all(s["ok"] for s in report["steps"])
    with atomic_path(os.path.join(out_dir, "report.json")) as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    with atomic_path(os.path.join(out_dir, "report.md")) as tmp, open(tmp, "w") as f:
        f.write(markdown(report))


if __name__ == "__main__":
    sys.exit(main())
