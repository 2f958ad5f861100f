"""`make bench` (analysis): time and peak memory of the non-learned pipelines on 512x512 phantoms.

Each run is a fresh process limited to 2 threads (as on the target machine), generating a phantom of
100, 300 and 600 slices and timing only the pipeline.  Targets for the non-learned pipeline:
<= 10 s and <= 2 GB at 300 slices, time growing no faster than linearly.  Not a test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

SIZES = [int(n) for n in os.environ.get("BENCH_SLICES", "100,300,600").split(",")]
PIPELINES = os.environ.get("BENCH_PIPELINES", "threshold,classical").split(",")

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
from triaged.analysis import default_registry
name = sys.argv[2]
with open(sys.argv[3], "rb") as fh:
    volume = pickle.load(fh)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
result = default_registry().get(name).run(volume)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_mb": peak / 1024, "before_mb": base / 1024,
                  "severity": result.findings.severity_pct}))
"""


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
    print("# analysis: 512x512 covid phantom, 1 mm slices, 2 threads; peak = process max RSS (volume included)")
    print("| pipeline | slices | seconds | s per 100 slices | peak MB | target (300 slices) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in PIPELINES:
        per100 = []
        for slices in SIZES:
            out = subprocess.run([sys.executable, "-c", CHILD, str(slices), name, volumes[slices]], env=env,
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            per100.append(r["seconds"] / slices * 100)
            target = ""
            if slices == 300:
                ok = r["seconds"] <= 10 and r["peak_mb"] <= 2048
                target = f"<= 10 s, <= 2 GB: {'met' if ok else 'NOT met'}"
            print(f"| {name} | {slices} | {r['seconds']:.1f} | {per100[-1]:.2f} | {r['peak_mb']:.0f} | {target} |")
        growth = per100[-1] / per100[0] if per100[0] else float("nan")
        print(f"{name}: time per slice at {SIZES[-1]} vs {SIZES[0]} slices: x{growth:.2f} "
              f"({'linear or better' if growth <= 1.15 else 'worse than linear'})")
    shutil.rmtree(tmp, ignore_errors=True)
    if 300 in SIZES:
        out = subprocess.run([sys.executable, "-c", ENCODE], env=env, capture_output=True, text=True, check=True)
        seconds, frames = out.stdout.split()[-2:]
        print(f"SEG of the 300-slice result ({frames} frames, warm): {float(seconds):.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
