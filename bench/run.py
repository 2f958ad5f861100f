"""`make bench`: throughput of the node against DCMTK's storescp, measured in the same run.

Sends the same 300-slice 512x512 CT series with DCMTK storescu (TCP_NODELAY=1) to (a) DCMTK storescp
(the reference: no fsync, no ledger) and (b) `triaged serve` (durable writes + ledger), and prints
images/s, MB/s and the ratio.  Targets: >= 250 images/s and >= 125 MB/s.  Not a test: these machines
are shared and noisy, so read the ratio, and run it twice if it looks off.
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
        ["storescu", "-aec", aec, "+sd", "127.0.0.1", str(port), str(folder)],
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


def main() -> int:
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} missing: run `make sysdeps` (installs dcmtk)")
    with tempfile.TemporaryDirectory(prefix="triaged-bench-") as tmp:
        work = Path(tmp)
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
              f"({'met' if nbytes / ours / 1e6 >= 125 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
