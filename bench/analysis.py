"""`make bench` (analysis): time and peak memory of the pipelines on 512x512 phantoms.

Each run is a fresh process limited to 2 threads (as on the target machine), generating a phantom of
100, 300 and 600 slices and timing only the pipeline.  Targets at 300 slices: <= 10 s and <= 2 GB for the
non-learned pipelines (issue 13), <= 20 s for the paper pipelines ``m2unet``, ``dacmil`` and
``multiscale`` (issue 14: each runs ``classical`` first, then its network), time growing no faster than
linearly.  ``BENCH_PIPELINES`` chooses the pipelines (learned ones are timed only when their weights are
shipped).  The CPU table runs on the CPU even where there is a GPU; with a CUDA device the learned
pipelines (``BENCH_GPU_PIPELINES``) are then timed on it too, against the CPU in the same run (issue 13
item 5; printed as skipped without one).

Then the whole worker task (``triaged.worker.task.run_task``: load the DICOM files, analyse with the
default ``classical`` pipeline, write masks and findings, encode SR + SEG + SC) on phantom studies of
300, 600 and 1,200 slices written as DICOM files, each in a fresh process: peak RSS per phase against
issue 13's targets (<= 1.5 / 2 / 3 GiB; the default memory guard is 6 GiB).  ``BENCH_TASK_SLICES``
chooses the sizes (empty: skip); a 1,200-slice phantom takes minutes to generate.  Not a test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

SIZES = [int(n) for n in os.environ.get("BENCH_SLICES", "100,300,600").split(",") if n]
PIPELINES = os.environ.get("BENCH_PIPELINES", "threshold,classical,m2unet,dacmil,multiscale").split(",")
#: Timed on the CUDA device as well, when there is one (issue 13 item 5).
GPU_PIPELINES = os.environ.get(
    "BENCH_GPU_PIPELINES", "multitask,consolidation-em,m2unet,dacmil,multiscale"
).split(",")
#: Seconds allowed at 300 slices: the non-learned pipelines (issue 13) and the learned ones (issue 14).
TARGET_300_S = {"threshold": 10.0, "classical": 10.0}
LEARNED_TARGET_300_S = 20.0
TASK_SIZES = [int(n) for n in os.environ.get("BENCH_TASK_SLICES", "300,600,1200").split(",") if n]
TASK_PIPELINE = os.environ.get("BENCH_TASK_PIPELINE", "classical")
#: Issue 13: peak worker RSS, MiB, by slice count.
TASK_TARGET_MB = {300: 1536, 600: 2048, 1200: 3072}

MAKE = r"""
import pickle, sys, time
from triaged.lab.phantom import PhantomSpec, generate, to_volume
t0 = time.perf_counter()
phantom = generate(PhantomSpec(kind="covid", severity=30, seed=11, matrix=512, slice_thickness=1.0,
                               slices=int(sys.argv[1])))
print(f"{time.perf_counter() - t0:.1f}")
with open(sys.argv[2], "wb") as fh:
    pickle.dump(to_volume(phantom), fh)
"""

# Encoding the results of the 300-slice analysis: SEG is the slow object (highdicom).
ENCODE = r"""
import pickle, sys, time
from triaged.analysis import default_registry
from triaged.encode import OutputContext, build_seg
from triaged.lab.phantom import PhantomSpec, generate, to_datasets, to_volume
phantom = generate(PhantomSpec(kind="covid", severity=30, seed=11, matrix=512, slice_thickness=1.0, slices=300))
volume = to_volume(phantom)
source = [d for d in to_datasets(phantom) if d.SeriesInstanceUID == volume.series_instance_uid]
result = default_registry().get("classical").run(volume)
ctx = OutputContext(software_version="bench")
build_seg(result.findings, result.masks, volume, source, ctx)  # highdicom loads its tables once
t0 = time.perf_counter()
seg = build_seg(result.findings, result.masks, volume, source, ctx)
print(f"{time.perf_counter() - t0:.2f} {seg.NumberOfFrames}")
"""

# The volume is made in another process so the peak below is the pipeline's (plus the volume itself).
CHILD = r"""
import json, pickle, resource, sys, time
import torch
torch.set_num_threads(2)
from triaged.nets.pipelines import node_registry
name = sys.argv[2]
with open(sys.argv[3], "rb") as fh:
    volume = pickle.load(fh)
pipeline = node_registry(sys.argv[4]).get(name)  # "cpu", or "cuda" for the GPU table
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
result = pipeline.run(volume)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_mb": peak / 1024, "before_mb": base / 1024,
                  "severity": result.findings.severity_pct}))
"""


# A phantom study written as DICOM files under OUT/spool, as the receiver would have stored it.
WRITE_STUDY = r"""
import sys
from pathlib import Path
from triaged.lab.phantom import PhantomSpec, generate, to_datasets, to_volume
n, out = int(sys.argv[1]), Path(sys.argv[2])
ph = generate(PhantomSpec(kind="covid", severity=30, seed=11, matrix=512, slice_thickness=1.0, slices=n), workers=1)
vol = to_volume(ph)
paths = []
for i, d in enumerate(d for d in to_datasets(ph) if d.SeriesInstanceUID == vol.series_instance_uid):
    rel = f"studies/s/{i:05d}.dcm"
    (out / "spool" / rel).parent.mkdir(parents=True, exist_ok=True)
    d.save_as(out / "spool" / rel, enforce_file_format=True)
    paths.append(rel)
(out / "meta.txt").write_text(f"{vol.study_instance_uid}\n{vol.series_instance_uid}\n" + "\n".join(paths))
"""

# The worker task in a fresh process; RSS sampled every 5 ms and attributed to the phase running.
TASK = r"""
import json, sys, threading, time
from pathlib import Path
out, pipeline = Path(sys.argv[1]), sys.argv[2]
study, series, *paths = (out / "meta.txt").read_text().split("\n")
def rss():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
phase, peaks = ["start"], {}
def sample():
    while True:
        peaks[phase[0]] = max(peaks.get(phase[0], 0.0), rss())
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
import triaged.volume
import triaged.worker.task
from triaged.worker.task import AnalysisTask, run_task
load = triaged.volume.load_volume
def load_volume(*a, **k):
    phase[0] = "load"
    v = load(*a, **k)
    phase[0] = "analysis"
    return v
triaged.volume.load_volume = load_volume
save_masks = triaged.worker.task.save_masks
def save(*a, **k):  # while the SEG child works, when the task encodes: then back to "encode"
    before, phase[0] = phase[0], "write"
    try:
        return save_masks(*a, **k)
    finally:
        phase[0] = before
triaged.worker.task.save_masks = save
def encoding(_):
    phase[0] = "encode"
base = rss()
t0 = time.perf_counter()
task = AnalysisTask(job_id=1, study_uid=study, series_uid=series, pipeline=pipeline,
                    spool_root=str(out / "spool"), instance_paths=tuple(paths), work_dir=str(out / "spool/work/1"),
                    encode=True, registry="triaged.nets.pipelines:node_registry", threads=2)
res = run_task(task, encoding)
phase[0] = "done"
time.sleep(0.05)
import resource  # the SEG is built in a forked child: its peak RSS (pages shared with the worker included)
child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"ok": res.ok, "error": res.error, "seconds": time.perf_counter() - t0, "base_mb": base,
                  "peaks": {k: v for k, v in peaks.items() if k != "done"}, "child_mb": child_mb}))
"""


def task_memory(env: dict[str, str]) -> None:
    """Peak RSS of the whole worker task per phase, a fresh process per study size."""
    print(
        f"# worker task ({TASK_PIPELINE}, load + analysis + write + encode): 512x512 covid phantom studies "
        "as DICOM files, 1 mm slices; peak RSS per phase, MiB"
    )
    print("| slices | load | analysis | write | encode | peak | target | seconds | SEG child (shared pages included) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for slices in TASK_SIZES:
        folder = tempfile.mkdtemp(prefix=f"triaged-bench-task-{slices}-")
        try:
            subprocess.run(
                [sys.executable, "-c", WRITE_STUDY, str(slices), folder],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            out = subprocess.run(
                [sys.executable, "-c", TASK, folder, TASK_PIPELINE],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        peaks = r["peaks"]
        peak = max(peaks.values())
        target = TASK_TARGET_MB.get(slices)
        verdict = f"<= {target} ({'met' if peak <= target else 'NOT met'})" if target else ""
        if not r["ok"]:
            verdict = f"FAILED: {r['error']}"
        cells = " | ".join(f"{peaks.get(k, 0.0):.0f}" for k in ("load", "analysis", "write", "encode"))
        print(f"| {slices} | {cells} | {peak:.0f} | {verdict} | {r['seconds']:.0f} | {r['child_mb']:.0f} |", flush=True)


def gpu_analysis(env: dict[str, str], volume: str, shipped: set[str]) -> None:
    """Issue 13 item 5: the learned pipelines on the CUDA device (bf16, slices batched), when there is one.

    The same 300-slice phantom and fresh processes as the CPU table; the CPU parts of each pipeline (lungs,
    lobes, measures) run as on the CPU, so the ratio is the whole pipeline's, not the network's alone.
    """
    import torch

    if not torch.cuda.is_available():
        print("# analysis on a GPU: skipped, no CUDA device (torch.cuda.is_available() is False)")
        return
    print(f"# analysis on the GPU ({torch.cuda.get_device_name(0)}), 512x512x300 covid phantom, bf16; CPU on "
          "the same machine for the ratio")
    print("| pipeline | CPU seconds | GPU seconds | GPU / CPU |")
    print("| --- | --- | --- | --- |")
    for name in GPU_PIPELINES:
        if name not in shipped:
            continue
        seconds = {}
        for device in ("cpu", "cuda"):
            out = subprocess.run([sys.executable, "-c", CHILD, "300", name, volume, device], env=env,
                                 capture_output=True, text=True, check=True)
            seconds[device] = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
        print(f"| {name} | {seconds['cpu']:.2f} | {seconds['cuda']:.2f} | {seconds['cuda'] / seconds['cpu']:.2f} |",
              flush=True)


def main() -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    tmp = tempfile.mkdtemp(prefix="triaged-bench-")
    volumes = {}
    for slices in SIZES:
        volumes[slices] = os.path.join(tmp, f"volume-{slices}.pickle")
        made = subprocess.run([sys.executable, "-c", MAKE, str(slices), volumes[slices]], env=env, check=True,
                              capture_output=True, text=True)
        seconds = float(made.stdout.split()[-1])
        note = f" (target <= 10 s: {'met' if seconds <= 10 else 'NOT met'})" if slices == 300 else ""
        print(f"phantom generation 512x512x{slices}: {seconds:.1f} s{note}")
    if SIZES:
        print("# analysis: 512x512 covid phantom, 1 mm slices, 2 threads; peak = process max RSS (volume included)")
        print("| pipeline | slices | seconds | s per 100 slices | peak MB | target (300 slices) |")
        print("| --- | --- | --- | --- | --- | --- |")
    from triaged.nets.pipelines import node_registry

    shipped = {p.name for p in node_registry()}
    for name in PIPELINES if SIZES else []:
        if name not in shipped:
            print(f"| {name} | - | - | - | - | not shipped (no weights in models/) |")
            continue
        per100 = []
        limit = TARGET_300_S.get(name, LEARNED_TARGET_300_S)
        for slices in SIZES:
            out = subprocess.run([sys.executable, "-c", CHILD, str(slices), name, volumes[slices], "cpu"],
                                 env=env, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            per100.append(r["seconds"] / slices * 100)
            target = ""
            if slices == 300:
                ok = r["seconds"] <= limit and r["peak_mb"] <= 2048
                target = f"<= {limit:.0f} s, <= 2 GB: {'met' if ok else 'NOT met'}"
            print(f"| {name} | {slices} | {r['seconds']:.1f} | {per100[-1]:.2f} | {r['peak_mb']:.0f} | {target} |")
        growth = per100[-1] / per100[0] if per100[0] else float("nan")
        print(f"{name}: time per slice at {SIZES[-1]} vs {SIZES[0]} slices: x{growth:.2f} "
              f"({'linear or better' if growth <= 1.15 else 'worse than linear'})")
    if 300 in SIZES:
        gpu_analysis(env, volumes[300], shipped)
    shutil.rmtree(tmp, ignore_errors=True)
    if 300 in SIZES:
        out = subprocess.run([sys.executable, "-c", ENCODE], env=env, capture_output=True, text=True, check=True)
        seconds, frames = out.stdout.split()[-2:]
        print(f"SEG of the 300-slice result ({frames} frames, warm): {float(seconds):.2f} s")
    if TASK_SIZES:
        task_memory(env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
