"""`make bench`: throughput of the node against DCMTK's storescp, and the latency of its results.

Receive: sends the same 300-slice 512x512 CT series with DCMTK storescu (TCP_NODELAY=1) to (a) DCMTK
storescp (the reference: no fsync, no ledger) and (b) `triaged serve` (durable writes + ledger), and prints
images/s, MB/s and the ratio.  Targets: >= 250 images/s and >= 125 MB/s.

Latency (issue 13): `triaged serve` with the default config (a storescp destination added) gets a
300-slice 512x512 phantom study per pipeline (``threshold``, ``classical`` and the learned ones whose
weights are present), and the time from its last C-STORE to the last result object acknowledged by
storescp is printed per stage from the ledger's job history; then ten 100-slice studies back to back:
total (first COMPLETE to last acknowledgement) against the sum of their analysis + encode times (target
<= 1.2x).  ``BENCH_PARTS`` chooses the parts (``receive,latency,batch``), ``BENCH_PIPELINES`` the pipelines.

Not a test: these machines are shared and noisy, so read the ratios, and run it twice if one looks off.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

SLICES = 300
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2"))
ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_series(folder: Path) -> int:
    """A 300-slice CT series with realistic headers and incompressible-ish noise; returns total bytes."""
    rng = np.random.default_rng(0)
    study, series = generate_uid(), generate_uid()
    total = 0
    for i in range(SLICES):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID = CTImageStorage
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID = "BENCH^SERIES", "BENCH"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-160, -160, -i * 1.0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.625, 0.625]
        ds.SliceThickness = 1.0
        ds.Rows = ds.Columns = 512
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = rng.integers(0, 2000, (512, 512), dtype=np.uint16).tobytes()
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


def send(folder: Path, port: int, aec: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        ["storescu", "-aec", aec, "+sd", "+r", "127.0.0.1", str(port), str(folder)],
        check=True, env=ENV, capture_output=True,
    )
    return time.perf_counter() - t0


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listening on {port} after {timeout} s")


def bench_storescp(series: Path, work: Path) -> list[float]:
    times = []
    for r in range(ROUNDS):
        out = work / f"storescp-{r}"
        out.mkdir()
        port = free_port()
        proc = subprocess.Popen(["storescp", "-od", str(out), "+xa", str(port)], env=ENV)
        try:
            wait_port(port)
            times.append(send(series, port, "STORESCP"))
        finally:
            proc.terminate()
            proc.wait()
    return times


def bench_triaged(series: Path, work: Path) -> list[float]:
    times = []
    for r in range(ROUNDS):
        port = free_port()
        cfg = work / f"triaged-{r}.yaml"
        cfg.write_text(
            f"listener: {{bind_address: 127.0.0.1, port: {port}}}\n"
            f"storage: {{spool: spool-{r}, ledger: ledger-{r}.sqlite, min_free_mb: 0}}\n"
            "completion: {delay_seconds: 600}\nlogging: {level: WARNING}\nworklist: {http_port: 0}\n"
        )
        proc = subprocess.Popen([sys.executable, "-m", "triaged.cli", "serve", "--config", str(cfg)])
        try:
            wait_port(port)
            times.append(send(series, port, "TRIAGED"))
        finally:
            proc.terminate()
            proc.wait(30)
        stored = len(list((work / f"spool-{r}" / "studies").rglob("*.dcm")))
        if stored != SLICES:
            raise SystemExit(f"triaged stored {stored} of {SLICES} instances")
    return times


PARTS = os.environ.get("BENCH_PARTS", "receive,latency,batch").split(",")


def phantom_study(folder: Path, slices: int, seed: int) -> Path:
    """A 512x512 COVID-like phantom study of ``slices`` 1 mm slices (its own UIDs) under ``folder``."""
    from triaged.lab.datasets import write_dicom_study
    from triaged.lab.phantom import PhantomSpec, generate, to_datasets

    spec = PhantomSpec(kind="covid", severity=30, seed=seed, matrix=512, slice_thickness=1.0, slices=slices)
    write_dicom_study(to_datasets(generate(spec)), folder)
    return folder


class LatencyNode:
    """`triaged serve` on the default config plus a storescp destination, in ``work``."""

    def __init__(self, work: Path, pipeline: str) -> None:
        self.work = work
        work.mkdir(parents=True)
        self.port, dest_port = free_port(), free_port()
        (work / "received").mkdir()
        self.storescp = subprocess.Popen(["storescp", "-od", str(work / "received"), "+xa", str(dest_port)], env=ENV)
        cfg = work / "config.yaml"
        cfg.write_text(
            f"listener: {{bind_address: 127.0.0.1, port: {self.port}}}\n"
            f"storage: {{spool: {work / 'spool'}, ledger: {work / 'ledger.sqlite'}, min_free_mb: 0}}\n"
            f"destinations: {{dest: {{ae_title: STORESCP, host: 127.0.0.1, port: {dest_port}}}}}\n"
            f"routing: {{default: {{pipelines: [{pipeline}], destinations: [dest]}}}}\n"
            "logging: {level: WARNING}\nworklist: {http_port: 0}\n"
        )
        self.proc = subprocess.Popen([sys.executable, "-m", "triaged.cli", "serve", "--config", str(cfg)], env=ENV)
        wait_port(dest_port)
        wait_port(self.port)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.storescp.terminate()
        self.storescp.wait()

    def wait_done(self, jobs: int, timeout: float = 1800) -> list[dict[str, float]]:
        """Wait until ``jobs`` jobs are DONE; their stage times (seconds, from the ledger)."""
        from triaged.domain import JobState
        from triaged.ledger import Ledger

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ledger = Ledger(self.work / "ledger.sqlite")
            try:
                done = ledger.jobs(states=[JobState.DONE], limit=100)
                failed = ledger.jobs(states=[JobState.FAILED, JobState.IGNORED], limit=100)
                if failed:
                    raise SystemExit(f"job {failed[0].id} {failed[0].state.value}: {failed[0].detail}")
                if len(done) >= jobs:
                    last_seen = {s.study_instance_uid: s.last_seen for s in ledger.studies(limit=100)}
                    return [self._stages(ledger, ledger.job(j.id), last_seen) for j in reversed(done)]
            finally:
                ledger.close()
            time.sleep(0.5)
        raise SystemExit(f"fewer than {jobs} job(s) DONE after {timeout:.0f} s")

    @staticmethod
    def _stages(ledger: Any, job: Any, last_seen: dict[str, Any]) -> dict[str, float]:
        at = {to: when for when, _frm, to, _detail in job.history}
        acked = max(i.sent_at for i in ledger.outbox(job_id=job.id))
        t0 = last_seen[job.study_instance_uid]
        return {
            "last_store": t0.timestamp(),
            "complete_at": at["COMPLETE"].timestamp(),
            "acked_at": acked.timestamp(),
            "completion": (at["COMPLETE"] - t0).total_seconds(),
            "queue": (at["ANALYSING"] - at["COMPLETE"]).total_seconds(),
            "analysis": (at["ENCODING"] - at["ANALYSING"]).total_seconds(),
            "encode": (at["DISPATCHING"] - at["ENCODING"]).total_seconds(),
            "dispatch": (acked - at["DISPATCHING"]).total_seconds(),
            "complete_to_ack": (acked - at["COMPLETE"]).total_seconds(),
        }


def bench_latency(work: Path, study: Path, pipelines: list[str]) -> None:
    print(f"\n# latency: {SLICES}-slice 512x512 phantom, default config (completion.delay_seconds 30), "
          "last C-STORE -> last result acknowledged by storescp")
    print("| pipeline | wait for completion | queue -> analysis start | analysis | encode | dispatch "
          "| COMPLETE -> last ack | target <= 10 s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in pipelines:
        node = LatencyNode(work / f"latency-{name}", name)
        try:
            time.sleep(5)  # the worker is warm with the node; leave it the time a real node has
            send(study, node.port, "TRIAGED")
            (t,) = node.wait_done(1)
        finally:
            node.close()
        total = t["complete_to_ack"]
        print(f"| {name} | {t['completion']:.2f} s | {t['queue']:.2f} s | {t['analysis']:.2f} s | "
              f"{t['encode']:.2f} s | {t['dispatch']:.2f} s | {total:.2f} s | "
              f"{'met' if total <= 10 else 'NOT met'} |", flush=True)


def bench_batch(work: Path, studies: list[Path]) -> None:
    node = LatencyNode(work / "batch", "classical")
    try:
        time.sleep(5)
        for folder in studies:
            send(folder, node.port, "TRIAGED")
        times = node.wait_done(len(studies))
    finally:
        node.close()
    total = max(t["acked_at"] for t in times) - min(t["complete_at"] for t in times)
    work_s = sum(t["analysis"] + t["encode"] for t in times)
    print(f"\n# {len(studies)} x 100-slice studies back to back (classical, default config): first COMPLETE -> "
          f"last ack {total:.1f} s; sum of analysis + encode {work_s:.1f} s; ratio {total / work_s:.2f} "
          f"(target <= 1.2: {'met' if total / work_s <= 1.2 else 'NOT met'}); per study queue wait "
          f"{', '.join(format(t['queue'], '.1f') for t in times)} s", flush=True)


def main() -> int:
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} missing: run `make sysdeps` (installs dcmtk)")
    with tempfile.TemporaryDirectory(prefix="triaged-bench-") as tmp:
        work = Path(tmp)
        if "receive" in PARTS:
            bench_receive(work)
        if "latency" in PARTS:
            from triaged.nets.pipelines import node_registry

            wanted = os.environ.get("BENCH_PIPELINES", "")
            names = wanted.split(",") if wanted else ["threshold", "classical",
                                                    *(n for n in node_registry().pipeline_names()
                                                      if n not in ("threshold", "classical"))]
            bench_latency(work, phantom_study(work / "phantom-300", SLICES, 11), names)
        if "batch" in PARTS:
            bench_batch(work, [phantom_study(work / f"phantom-100-{i}", 100, 100 + i) for i in range(10)])
    return 0


def bench_receive(work: Path) -> None:
    series = work / "series"
    series.mkdir()
    nbytes = write_series(series)
    print(f"# receive: {SLICES} CT slices 512x512, {nbytes / 1e6:.0f} MB, storescu TCP_NODELAY=1, best of {ROUNDS}")
    ref = min(bench_storescp(series, work))
    ours = min(bench_triaged(series, work))
    print("| receiver | images/s | MB/s | ratio to storescp |")
    print("| --- | --- | --- | --- |")
    for name, t in (("DCMTK storescp (no fsync, no ledger)", ref), ("triaged (fsync + ledger)", ours)):
        print(f"| {name} | {SLICES / t:.0f} | {nbytes / t / 1e6:.0f} | {ref / t:.2f} |")
    ratio = ref / ours
    print(f"target: >= 250 images/s and >= 125 MB/s on the reference machine, where storescp does ~1,440 "
          f"images/s: a ratio of >= {250 / 1440:.2f}. Here: ratio {ratio:.2f} "
          f"({'met' if ratio >= 250 / 1440 else 'NOT met'}); absolute {SLICES / ours:.0f} images/s "
          f"({'met' if SLICES / ours >= 250 else 'NOT met'}), {nbytes / ours / 1e6:.0f} MB/s "
          f"({'met' if nbytes / ours / 1e6 >= 125 else 'NOT met'})", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
