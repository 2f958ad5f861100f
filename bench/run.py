"""`make bench`: throughput of the node against DCMTK's storescp, and the latency of its results.

Receive (issue 13 item 4): the same 300-slice 512x512 CT series, written once, sent with DCMTK storescu
(TCP_NODELAY=1; four storescu processes for four associations) to (a) a bare pynetdicom SCP in its own
process that accepts C-STORE and stores nothing (the node's AE settings: max_pdu 0, TCP_NODELAY), (b) DCMTK
storescp (TCP_NODELAY=1, writing to a temp folder) and (c) `triaged serve` (durable writes + ledger), on one
association and on four; images/s and the ratios are printed.  Targets: one association >= 0.5x the bare
SCP; four >= 250 images/s and >= 0.5x storescp.  Then receive while a 300-slice ``classical`` analysis
runs in the node against the same node idle (target >= 0.8x).

Latency (issue 13): `triaged serve` with the default config (a storescp destination added) gets a
300-slice 512x512 phantom study per pipeline (``threshold``, ``classical`` and the learned ones whose
weights are present), and the time from its last C-STORE to the last result object acknowledged by
storescp is printed per stage from the ledger's job history; then ten 100-slice studies back to back:
total (first COMPLETE to last acknowledgement) against the sum of their analysis + encode times (target
<= 1.2x).  ``BENCH_PARTS`` chooses the parts (``receive,latency,batch,cluster``), ``BENCH_PIPELINES`` the
pipelines.

Cluster (issue 16): studies per minute on the same phantom set (eight 100-slice studies, ``classical``;
``BENCH_CLUSTER_STUDIES`` changes the count) through nodes sharing a throwaway PostgreSQL ledger
(``tests/pg.py``) and one spool folder: a receiver node (roles receive, complete, dispatch) and 1, then 2,
analysing nodes (role analyse); first COMPLETE -> last result acknowledged, and the ratio.  Each analyser
uses ``analysis.threads`` CPU threads, so on a machine with two cores the ratio stays near 1 (up to about
1.5, from overlapping volume loading and encoding): more analysers help where there are cores (or GPUs)
for them.

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

from triaged.config.schema import ListenerConfig

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


def send_parallel(files: list[Path], port: int, aec: str, associations: int) -> float:
    """Send ``files`` over ``associations`` concurrent storescu processes (one association each); wall seconds."""
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aec", aec, "127.0.0.1", str(port), *map(str, files[i::associations])],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in range(associations)
    ]
    for proc in procs:
        _out, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"storescu failed ({proc.returncode}): {err.decode(errors='replace')[-500:]}")
    return time.perf_counter() - t0


def bare_scp(port: int) -> None:
    """A pynetdicom SCP that accepts every CT C-STORE and stores nothing (``bench/run.py bare-scp PORT``).

    The node's AE settings: unlimited PDU (max_pdu 0), TCP_NODELAY on each accepted socket, the same
    storage presentation contexts; the handler answers Success without decoding the dataset.
    """
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

    from triaged.config.schema import ListenerConfig
    from triaged.net.scp import storage_sop_classes

    def nodelay(event: Any) -> None:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    ae = AE(ae_title="BARE")
    ae.maximum_pdu_size = 0
    ae.maximum_associations = 16
    for uid in storage_sop_classes(ListenerConfig()):
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
    ae.start_server(
        ("127.0.0.1", port),
        block=True,
        evt_handlers=[(evt.EVT_CONN_OPEN, nodelay), (evt.EVT_C_STORE, lambda event: 0x0000)],
    )


def _processes(kind: str) -> int:
    """``listener.processes`` of a ``triaged`` kind: ``triaged`` (the default), ``triaged-p4`` (4)."""
    return int(kind.split("-p", 1)[1]) if "-p" in kind else 0


def _receivers_ready(
    proc: subprocess.Popen[bytes], ledger: Path, processes: int, timeout: float = 120
) -> None:
    """Wait until ``processes`` receiver processes of the node have its ledger open (then they serve)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = 0
        for task in Path(f"/proc/{proc.pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                try:
                    if b"triaged.receiver" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                        continue
                    links = {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}
                except OSError:
                    continue
                ready += any(link.startswith(str(ledger)) for link in links)
        if ready >= processes:
            time.sleep(1)  # from the ledger open to serving: the AE and the server (milliseconds)
            return
        time.sleep(0.2)
    raise SystemExit(f"{processes} receiver processes not ready after {timeout} s")


def _receiver(kind: str, work: Path, tag: str, extra: str = "") -> tuple[subprocess.Popen[bytes], int, Path]:
    """Start a receiver (``bare``, ``storescp``, ``triaged`` or ``triaged-pN``: N receiver processes) in its
    own process; its process, port, folder."""
    port, out = free_port(), work / f"{kind}-{tag}"
    out.mkdir(parents=True)
    if kind == "bare":
        cmd = [sys.executable, __file__, "bare-scp", str(port)]
    elif kind == "storescp":
        cmd = ["storescp", "-od", str(out), "+xa", str(port)]
    else:
        processes = f", processes: {_processes(kind)}" if _processes(kind) else ""
        (out / "config.yaml").write_text(
            f"listener: {{bind_address: 127.0.0.1, port: {port}{processes}}}\n"
            f"storage: {{spool: {out / 'spool'}, ledger: {out / 'ledger.sqlite'}, min_free_mb: 0}}\n"
            "logging: {level: WARNING}\nworklist: {http_port: 0}\n"
            + (extra or "completion: {delay_seconds: 600}\n")
        )
        cmd = [sys.executable, "-m", "triaged.cli", "serve", "--config", str(out / "config.yaml")]
    proc = subprocess.Popen(cmd, env=ENV)
    wait_port(port)
    if _processes(kind) > 1:
        _receivers_ready(proc, out / "ledger.sqlite", _processes(kind))
    return proc, port, out


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _stored(kind: str, out: Path) -> int:
    if kind.startswith("triaged"):
        return len(list((out / "spool" / "studies").rglob("*.dcm")))
    if kind == "storescp":
        return sum(1 for p in out.iterdir() if p.is_file())
    return SLICES


def receive_rate(kind: str, files: list[Path], work: Path, tag: str, associations: int) -> float:
    """Images/s of one fresh receiver of ``kind`` for ``files`` over ``associations`` associations."""
    proc, port, out = _receiver(kind, work, tag)
    try:
        if kind.startswith("triaged"):
            time.sleep(3)  # the node's start-up (worker, reconcile) is not part of receiving
        aec = "TRIAGED" if kind.startswith("triaged") else kind.upper()[:16]
        seconds = send_parallel(files, port, aec, associations)
    finally:
        _stop(proc)
    if (stored := _stored(kind, out)) != len(files):
        raise SystemExit(f"{kind} stored {stored} of {len(files)} instances")
    return len(files) / seconds


def bench_receive(work: Path) -> None:
    series = work / "series"
    series.mkdir()
    nbytes = write_series(series)
    files = sorted(series.glob("*.dcm"))
    print(
        f"# receive: {SLICES} CT slices 512x512, {nbytes / 1e6:.0f} MB, storescu TCP_NODELAY=1 (one process "
        f"per association), best of {ROUNDS} (every receiver started fresh per round, rounds interleaved)"
    )
    kinds = ("bare", "storescp", "triaged")
    # listener.processes: the default (the kind ``triaged``, whatever the schema says) and these, on four
    # associations only (one association is served by one process whatever their number)
    pool_kinds = tuple(f"triaged-p{n}" for n in (2, 4))
    best: dict[tuple[str, int], float] = {}
    for r in range(ROUNDS):
        for n in (1, 4):
            for kind in kinds + (pool_kinds if n == 4 else ()):
                rate = receive_rate(kind, files, work, f"{n}-{r}", n)
                best[kind, n] = max(best.get((kind, n), 0.0), rate)
    default = ListenerConfig().processes
    names = {
        "bare": "bare pynetdicom SCP (stores nothing)",
        "storescp": "DCMTK storescp (no fsync, no ledger)",
        "triaged": f"triaged serve (fsync + ledger), listener.processes {default} (default)",
        **{k: f"triaged serve, listener.processes {_processes(k)}" for k in pool_kinds},
    }
    print(
        "| receiver | 1 association img/s | 4 associations img/s | 1 assoc. / bare | 4 assoc. / storescp "
        "| 4 assoc. / bare |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for kind in kinds + pool_kinds:
        one_rate = f"{best[kind, 1]:.0f}" if (kind, 1) in best else "-"
        one_ratio = f"{best[kind, 1] / best['bare', 1]:.2f}" if (kind, 1) in best else "-"
        print(
            f"| {names[kind]} | {one_rate} | {best[kind, 4]:.0f} | {one_ratio} | "
            f"{best[kind, 4] / best['storescp', 4]:.2f} | {best[kind, 4] / best['bare', 4]:.2f} |"
        )
    one = best["triaged", 1] / best["bare", 1]
    top = max(("triaged", *pool_kinds), key=lambda k: best[k, 4])
    four, four_ratio = best[top, 4], best[top, 4] / best["storescp", 4]
    print(
        f"targets: one association >= 0.5x bare SCP: {one:.2f} ({'met' if one >= 0.5 else 'NOT met'}); "
        f"four >= 250 img/s: {four:.0f} with {names[top]} ({'met' if four >= 250 else 'NOT met'}) and "
        f">= 0.5x storescp: {four_ratio:.2f} ({'met' if four_ratio >= 0.5 else 'NOT met'})",
        flush=True,
    )
    bench_receive_busy(work, files)


def bench_receive_busy(work: Path, files: list[Path]) -> None:
    """One association into a node that is analysing a 300-slice study (classical) against the same node idle.

    The node gets phantom study A with a 1 s completion delay (its receive rate is the idle figure); once
    A's job is ANALYSING the series is sent (the busy figure), then the ledger says whether the analysis
    and encoding of A still ran when the last instance was acknowledged.
    """
    from triaged.domain import JobState
    from triaged.ledger import Ledger

    study = phantom_study(work / "receive-busy-study", SLICES, 21)
    study_files = sorted(study.rglob("*.dcm"))
    ratios = []
    for r in range(ROUNDS):
        proc, port, out = _receiver(
            "triaged",
            work,
            f"busy-{r}",
            "completion: {delay_seconds: 1}\nrouting: {default: {pipelines: [classical], destinations: []}}\n",
        )
        try:
            time.sleep(3)
            idle = len(study_files) / send_parallel(study_files, port, "TRIAGED", 1)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                ledger = Ledger(out / "ledger.sqlite")
                try:
                    analysing = ledger.jobs(states=[JobState.ANALYSING], limit=1)
                finally:
                    ledger.close()
                if analysing:
                    break
                time.sleep(0.1)
            else:
                raise SystemExit("the analysis of the first study did not start within 120 s")
            t0 = time.time()
            busy_s = send_parallel(files, port, "TRIAGED", 1)
            t_end = t0 + busy_s
            busy = len(files) / busy_s
            ledger = Ledger(out / "ledger.sqlite")
            try:
                job = ledger.job(analysing[0].id)
            finally:
                ledger.close()
            left = {to: when.timestamp() for when, _frm, to, _detail in job.history}
            work_end = left.get("DISPATCHING", left.get("DONE", left.get("FAILED", float("inf"))))
        finally:
            _stop(proc)
        overlap = min(work_end, t_end) - t0
        ratios.append(busy / idle)
        print(
            f"round {r + 1}: idle {idle:.0f} img/s, while analysing {busy:.0f} img/s, ratio {busy / idle:.2f} "
            f"(analysis + encode overlapped {overlap:.1f} of {busy_s:.1f} s of the send)",
            flush=True,
        )
    best = max(ratios)
    print(
        f"receive while a 300-slice classical analysis runs / idle: best {best:.2f} "
        f"(target >= 0.8: {'met' if best >= 0.8 else 'NOT met'})",
        flush=True,
    )


PARTS = os.environ.get("BENCH_PARTS", "receive,latency,batch,cluster").split(",")


def phantom_study(folder: Path, slices: int, seed: int) -> Path:
    """A 512x512 COVID-like phantom study of ``slices`` slices (its own UIDs) under ``folder``.

    Slices are 1 mm thick, or thicker when that is needed for the 150 mm of coverage the default series
    choice asks for (100 slices: 1.6 mm), so every study is analysed, not IGNORED.
    """
    from triaged.lab.datasets import write_dicom_study
    from triaged.lab.phantom import PhantomSpec, generate, to_datasets

    thickness = max(1.0, 160.0 / slices)
    spec = PhantomSpec(kind="covid", severity=30, seed=seed, matrix=512, slice_thickness=thickness, slices=slices)
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
    import torch

    # the default config's analysis.device is "auto": the networks run on the GPU when there is one
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    target = 2.0 if gpu else 10.0
    print(f"\n# latency: {SLICES}-slice 512x512 phantom, default config (completion.delay_seconds 30), "
          "last C-STORE -> last result acknowledged by storescp; networks on "
          + (f"the GPU ({gpu}): issue 13's goal 2 s" if gpu else "the CPU: target 10 s"))
    print("| pipeline | wait for completion | queue -> analysis start | analysis | encode | dispatch "
          f"| COMPLETE -> last ack | target <= {target:g} s |")
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
              f"{'met' if total <= target else 'NOT met'} |", flush=True)


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


def _cluster_rate(work: Path, url: str, studies: list[Path], analysers: int) -> tuple[float, float]:
    """Studies per minute (first COMPLETE -> last ack) through one receiver node and ``analysers`` analysing
    nodes on the PostgreSQL ledger ``url``; also the sum of analysis + encode seconds."""
    import yaml

    from triaged.domain import JobState
    from triaged.ledger import Ledger

    work.mkdir(parents=True)
    dest_port, port = free_port(), free_port()
    (work / "received").mkdir()
    storescp = subprocess.Popen(["storescp", "-od", str(work / "received"), "+xa", str(dest_port)], env=ENV)
    procs: list[subprocess.Popen[bytes]] = []
    names = {
        "rx": ["receive", "complete", "dispatch"],
        **{f"analyser-{i}": ["analyse"] for i in range(analysers)},
    }
    ledger = Ledger(url)  # migrates the empty database before the nodes start
    try:
        for name, roles in names.items():
            config = {
                "listener": {
                    "bind_address": "127.0.0.1",
                    "port": port if "receive" in roles else free_port(),
                },
                "storage": {"spool": str(work / "spool"), "ledger": url, "min_free_mb": 0},
                "node": {"name": name, "roles": roles},
                "completion": {"delay_seconds": 2, "sweep_interval_seconds": 0.5},
                "dispatch": {"interval_seconds": 1},
                "destinations": {"dest": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": dest_port}},
                "routing": {"default": {"pipelines": ["classical"], "destinations": ["dest"]}},
                "logging": {"level": "WARNING"},
                "worklist": {"http_port": 0},
            }
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump(config))
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "triaged.cli", "serve", "--config", str(path)], env=ENV
                )
            )
        wait_port(dest_port)
        wait_port(port)
        deadline = time.monotonic() + 120
        while {n.name for n in ledger.nodes()} != set(names):
            if time.monotonic() > deadline:
                raise SystemExit("the cluster's nodes did not start within 120 s")
            time.sleep(0.5)
        time.sleep(5)  # the workers are warm with their nodes; leave them the time a real node has
        for folder in studies:
            send(folder, port, "TRIAGED")
        deadline = time.monotonic() + 3600
        while True:
            failed = ledger.jobs(states=[JobState.FAILED, JobState.IGNORED], limit=100)
            if failed:
                raise SystemExit(f"job {failed[0].id} {failed[0].state.value}: {failed[0].detail}")
            done = ledger.jobs(states=[JobState.DONE], limit=1000)
            if len(done) >= len(studies):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"fewer than {len(studies)} job(s) DONE after an hour")
            time.sleep(0.5)
        last_seen = {s.study_instance_uid: s.last_seen for s in ledger.studies(limit=1000)}
        times = [LatencyNode._stages(ledger, ledger.job(j.id), last_seen) for j in done]
    finally:
        ledger.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(60)
        storescp.terminate()
        storescp.wait()
    total = max(t["acked_at"] for t in times) - min(t["complete_at"] for t in times)
    return len(studies) * 60.0 / total, sum(t["analysis"] + t["encode"] for t in times)


def bench_cluster(work: Path, studies: list[Path]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.pg: the tests' throwaway PostgreSQL
    from tests.pg import PostgresCluster, postgres_bin

    bindir = postgres_bin()
    if bindir is None:
        print(
            "\n# cluster: skipped, no PostgreSQL server binaries (initdb, pg_ctl): `make sysdeps`", flush=True
        )
        return
    pg = PostgresCluster(bindir, free_port())
    try:
        rates = {n: _cluster_rate(work / f"cluster-{n}", pg.new_database(), studies, n) for n in (1, 2)}
    finally:
        pg.stop()
    (one, work1), (two, work2) = rates[1], rates[2]
    print(
        f"\n# cluster: {len(studies)} x 100-slice studies (classical) through a receiver node and 1 or 2 "
        f"analysing nodes on one PostgreSQL ledger: 1 analyser {one:.2f} studies/min (analysis + encode "
        f"{work1:.0f} s), 2 analysers {two:.2f} studies/min ({work2:.0f} s); ratio {two / one:.2f}. "
        f"This machine has {os.cpu_count()} CPU(s): with 2 a ratio near 1 is expected (1.0-1.5: both "
        "analysers share the same cores and gain only by overlapping their single-threaded parts, volume "
        "loading and encoding); a ratio near 2 needs the cores (or a GPU) for each analyser.",
        flush=True,
    )


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
        if "cluster" in PARTS:
            count = int(os.environ.get("BENCH_CLUSTER_STUDIES", "8"))
            bench_cluster(
                work, [phantom_study(work / f"cluster-100-{i}", 100, 200 + i) for i in range(count)]
            )
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["bare-scp"]:
        bare_scp(int(sys.argv[2]))
        raise SystemExit(0)
    raise SystemExit(main())
