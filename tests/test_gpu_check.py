"""tools/gpu_check.py: the prepared GPU check, rehearsed on the CPU (--cpu-tiny).

The test runs the quick steps end to end in a subprocess (the others -- G/train benchmarks, the style
transfer, the DDP run -- take minutes on 2 shared cores; tools/gpu_check.sh OUT --cpu-tiny runs them all)
and checks the report files; the report builder and the benchmark-table parser are checked on their own.
"""
import json
import os
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import gpu_check  # noqa: E402

ROOT = gpu_check.ROOT
RUN = gpu_check.run  # the real subprocess runner (some tests replace it)


def test_cpu_tiny_run_writes_a_complete_report(tmp_path):
    out = tmp_path / "report"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), str(out), "--cpu-tiny",
                           "--steps", "op_check,op_speed"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "cpu-tiny" and report["ok"] is True
    assert report["environment"]["device"] == "cpu" and report["environment"]["torch"]
    assert report["paper"] == gpu_check.PAPER
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["op_check", "op_speed"]
    assert "upfirdn2d ok" in steps["op_check"]["output"] and "fused_bias_act ok" in steps["op_check"]["output"]
    speed = steps["op_speed"]["output"]
    for name in ("upfirdn2d up=2 k=4", "upfirdn2d blur k=4", "fused_leaky_relu"):
        assert f"{name}" in speed
    assert speed.count("channels_last") == 3 and speed.count("contiguous") == 3
    md = (out / "report.md").read_text()
    assert md.startswith("# GPU check (cpu-tiny)")
    assert "| op_check | ok |" in md and "| op_speed | ok |" in md
    assert "4.6" in md and "210" in md  # the paper's numbers beside ours


def test_gpu_limits_fit_eight_minutes_the_build_comes_first_and_the_compile_last():
    assert sum(gpu_check.GPU["limits"].values()) <= 8 * 60
    names = [name for name, _ in gpu_check.STEPS]
    assert names[0] == "build" and names[-1] == "bench_compile"
    assert set(gpu_check.GPU["limits"]) == set(gpu_check.CPU_TINY["limits"]) == {name for name, _ in gpu_check.STEPS}
    result = gpu_check.step_build(gpu_check.CPU_TINY, "cpu", None)
    assert result["ok"] and result["output"].startswith("skipped")


def test_unknown_step_is_one_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), str(tmp_path), "--cpu-tiny",
                           "--steps", "op_check,warp_drive"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--steps: unknown step(s) ['warp_drive']" in proc.stderr


def test_bench_table_parser_and_markdown():
    text = ("# device=cuda\n| size | dtype | batch | what | median s | images/s |\n| --- | --- | --- | --- | --- | --- |\n"
            "| 1024 | float16 | 16 | G forward, natural | 0.012 | 83.33 |\n"
            "| 64 | bfloat16 | 2 | train 64 px: d_step | 1.500 | 5.33 |\n"
            "# peak CUDA memory 1.25 GB (size 1024, dtype float16, batch 16)\n# peak RSS 3.50 GB\n")
    assert gpu_check.table_rows(text) == [
        dict(size=1024, dtype="float16", batch=16, what="G forward, natural", seconds=0.012, images_per_s=83.33),
        dict(size=64, dtype="bfloat16", batch=2, what="train 64 px: d_step", seconds=1.5, images_per_s=5.33)]
    assert gpu_check.peak_memory(text) == [
        dict(what="peak CUDA memory (GB)", gb=1.25, size=1024, dtype="float16", batch=16),
        dict(what="peak RSS (GB)", gb=3.5)]
    report = dict(mode="gpu", started="now", total_seconds=12.0, environment=dict(device="cuda", gpu="X"),
                  steps=[dict(name="bench_g", ok=True, seconds=10.0, output="tail text",
                              rows=[dict(gpu_check.table_rows(text)[0], compile=False)]),
                         dict(name="ddp", ok=False, seconds=2.0, output="boom", ddp_warnings=["x"])])
    md = gpu_check.markdown(report)
    assert "| bench_g | ok | 10.0 |" in md and "| ddp | FAILED | 2.0 |" in md
    assert "| size | dtype | batch | what | seconds | images_per_s | compile |" in md
    assert "| 1024 | float16 | 16 | G forward, natural | 0.012 | 83.33 | False |" in md
    assert "- ddp_warnings: ['x']" in md and "boom" in md


def test_steps_keep_the_callers_pythonpath(monkeypatch):
    """Packages carried to a bare GPU machine are found through PYTHONPATH (the first run there lost them:
    the steps' PYTHONPATH was the repository alone and every bench.py failed on `import lmdb`)."""
    monkeypatch.setenv("PYTHONPATH", "/carried/site")
    ok, _, out = gpu_check.run([sys.executable, "-c", "import os; print(os.environ['PYTHONPATH'])"], 60)
    assert ok and out.strip() == os.pathsep.join([ROOT, "/carried/site"])



@pytest.fixture
def cuda_build(monkeypatch):
    """step_build on the "cuda" path with `run` replaced: build(outputs) gives the step's result for the
    (ok, output) each extension's build process returns (keyed by name), and the commands it was asked to
    run. STEP_ENV is a fresh dict for the test (the module's own is restored afterwards)."""
    monkeypatch.setattr(gpu_check, "STEP_ENV", {})

    def build(outputs):
        commands = []

        def fake_run(cmd, limit, env=None):
            commands.append((cmd[-1], limit))
            ok, text = outputs[cmd[-1]]
            return ok, 0.5, text

        monkeypatch.setattr(gpu_check, "run", fake_run)
        return gpu_check.step_build(gpu_check.GPU, "cuda", None), sorted(commands)

    return build


def _built(name):
    return True, f"[1/3] nvcc {name}_kernel.cu\n{name} built\n"


def test_build_that_disagrees_with_the_reference_is_not_ok(cuda_build):
    """A build whose self-check warned exits 0 (the extension falls back to the reference): the step must
    still fail and send the later steps to the reference ops."""
    warned = (True, "op/build.py:269: RuntimeWarning: [op.build] CUDA extension 'fused_bias_act' disagrees with the "
                    "PyTorch reference: output of case x is off by 0.5 relative (tolerance 1e-05); using the reference "
                    "instead\nfused_bias_act built\n")
    result, commands = cuda_build(dict(upfirdn2d=_built("upfirdn2d"), fused_bias_act=warned))
    limit = gpu_check.GPU["limits"]["build"]
    assert commands == [("fused_bias_act", limit), ("upfirdn2d", limit)]
    assert result["ok"] is False and "--- fused_bias_act\n" + warned[1] in result["output"]
    assert gpu_check.STEP_ENV == {"BLENDGAN_CUDA_OPS": "ref"}


def test_failed_build_sends_the_later_steps_to_the_reference_ops(cuda_build):
    result, _ = cuda_build(dict(upfirdn2d=(False, "nvcc fatal: unsupported gpu architecture\n[exit status 1]"),
                                fused_bias_act=_built("fused_bias_act")))
    assert result["ok"] is False and "nvcc fatal" in result["output"]
    assert result["later_steps"] == "BLENDGAN_CUDA_OPS=ref (the PyTorch reference ops)"
    assert gpu_check.STEP_ENV == {"BLENDGAN_CUDA_OPS": "ref"}
    # every later step's process sees it (the real runner)
    ok, _, out = RUN([sys.executable, "-c", "import os; print(os.environ.get('BLENDGAN_CUDA_OPS'))"], 60)
    assert ok and out.strip() == "ref"


def test_successful_build_leaves_the_later_steps_alone(cuda_build):
    result, _ = cuda_build(dict(upfirdn2d=_built("upfirdn2d"), fused_bias_act=_built("fused_bias_act")))
    assert result["ok"] is True and "later_steps" not in result and gpu_check.STEP_ENV == {}


def test_report_is_rewritten_after_every_step_and_a_raising_step_keeps_its_traceback(tmp_path, monkeypatch):
    """A run killed from outside (the device's per-command limit) keeps the steps it finished."""
    out = tmp_path / "report"
    seen = {}

    def first(cfg, device, out_dir):
        return dict(ok=True, seconds=1.0, output="first done")

    def second(cfg, device, out_dir):
        seen["steps"] = [s["name"] for s in json.loads((out / "report.json").read_text())["steps"]]
        seen["md"] = (out / "report.md").read_text()
        raise ZeroDivisionError("second broke")

    monkeypatch.setattr(gpu_check, "STEPS", [("first", first), ("second", second)])
    assert gpu_check.main([str(out), "--cpu-tiny"]) == 1
    assert seen["steps"] == ["first"] and "| first | ok | 1.0 |" in seen["md"]
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["steps"]] == ["first", "second"] and report["ok"] is False
    broken = report["steps"][1]["output"]
    assert broken.startswith("Traceback") and "ZeroDivisionError: second broke" in broken and "in second" in broken


def _state(pid):
    """The process's state letter (R, S, Z, ...), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def test_a_killed_step_takes_the_processes_it_started_with_it(tmp_path):
    """A timed-out build leaves no nvcc writing into the build folder, a torchrun no worker on the GPU."""
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print('CHILD', child.pid, flush=True)\n"
            "time.sleep(60)\n")
    ok, seconds, out = gpu_check.run([sys.executable, "-c", code], 3)
    assert not ok and "[killed after 3 s]" in out and seconds < 30
    pid = int(out.split("CHILD ")[1].split()[0])
    deadline = time.time() + 10
    while _state(pid) not in (None, "Z") and time.time() < deadline:
        time.sleep(0.1)
    assert _state(pid) in (None, "Z")
    ok, _, out = gpu_check.run([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], 30)
    assert not ok and out.startswith("out") and "[exit status 3]" in out


def test_a_killed_step_stops_workers_in_their_own_session_as_torchrun_does():
    """torchrun starts its workers in sessions of their own and stops them on SIGTERM: a timed-out step gets
    SIGTERM first (SIGKILL alone would leave the worker running, on the GPU, holding the output pipe)."""
    code = ("import signal, subprocess, sys, time\n"
            "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
            "def stop(*_):\n"
            "    worker.terminate(); worker.wait(); sys.exit(143)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            "print('WORKER', worker.pid, flush=True)\n"
            "time.sleep(60)\n")
    ok, seconds, out = gpu_check.run([sys.executable, "-c", code], 3)
    assert not ok and "[killed after 3 s]" in out and seconds < 30
    assert out.count("WORKER") == 1
    assert _state(int(out.split("WORKER ")[1].split()[0])) in (None, "Z")
