"""The listener against real peers: DCMTK echoscu/storescu and a pynetdicom SCU, on a free port."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, _config, evt
from pynetdicom.sop_class import BasicTextSRStorage, CTImageStorage

from tests.conftest import make_config, require_tool
from tests.integration.conftest import storescu, wait_for
from triaged.assembly import select_series
from triaged.config import Config
from triaged.daemon import Node
from triaged.domain import JobState
from triaged.net.scp import (
    STATUS_ENCODING_MISMATCH,
    STATUS_INSTANCE_MISMATCH,
    STATUS_INVALID_UID,
    STATUS_MISSING_PIXELS,
    STATUS_OUT_OF_RESOURCES,
    STATUS_TRUNCATED_PIXELS,
    STATUS_UID_CONFLICT,
    STATUS_UNDECODABLE,
)
from triaged.volume import load_volume, read_headers

pytestmark = pytest.mark.integration


def _scu(ae_title: str = "TESTSCU", contexts: list[str] | None = None) -> AE:
    ae = AE(ae_title=ae_title)
    for cx in contexts or [CTImageStorage]:
        ae.add_requested_context(cx, [ExplicitVRLittleEndian])
    ae.add_requested_context("1.2.840.10008.1.1")
    return ae


def _send(node: Node, items: list[Dataset | Path], ae_title: str = "TESTSCU") -> list[Dataset]:
    host, port = node.listener.address
    assoc = _scu(ae_title).associate(host, port, ae_title="TRIAGED")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(item) for item in items]
    finally:
        assoc.release()


def test_echoscu_gets_a_c_echo_answer(node_factory: Callable[[Config], Node], tmp_path: Path) -> None:
    require_tool("echoscu")
    node = node_factory(make_config(tmp_path))
    host, port = node.listener.address
    proc = subprocess.run(
        ["echoscu", "-aec", "TRIAGED", host, str(port)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    [assoc] = node.ledger.associations(limit=5)
    assert assoc.calling_ae == "ECHOSCU" and assoc.accepted


def test_a_ct_series_from_storescu_is_stored_completed_and_queued(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path
) -> None:
    require_tool("storescu")
    node = node_factory(make_config(tmp_path))
    proc = storescu(*node.listener.address, phantom_ct_series)
    assert proc.returncode == 0, proc.stderr
    # What the source files say: slice count, matrix, position and spacing of the series.
    sources = sorted(
        (dcmread(f, stop_before_pixels=True) for f in phantom_ct_series.iterdir()),
        key=lambda d: float(d.ImagePositionPatient[2]),
    )
    first, count = sources[0], len(sources)
    [study] = node.ledger.studies()
    assert study.instances == count and study.series == 1
    # Every acknowledged instance is on disk with the bytes storescu sent.
    for path, *_ in node.ledger.study_instances(study.study_instance_uid):
        ds = dcmread(node.spool.root / path)
        assert ds.StudyInstanceUID == study.study_instance_uid
    job = wait_for(
        lambda: next(iter(node.ledger.jobs(states=[JobState.DONE])), None), timeout=120,
        what="the job to be analysed",  # the worker is niced below everything else a busy CI runs
    )
    queued = next(d for _, _, to, d in node.ledger.job(job.id).history if to == "QUEUED")
    assert f"{count} axial slices" in queued
    assert job.series_instance_uid == first.SeriesInstanceUID
    assert node.ledger.findings(job.id) is not None
    [audit] = node.ledger.associations()
    assert (audit.calling_ae, audit.instances, audit.failures) == ("STORESCU", count, 0)
    # The chosen series assembles from the spool with the geometry of the source files.
    rows = node.ledger.study_instances(study.study_instance_uid)
    headers, problems = read_headers(node.spool.root, [r[0] for r in rows])
    choice = select_series(headers, node.config.series_selection)
    volume = load_volume(node.spool.root, choice, study.study_instance_uid)
    assert problems == [] and volume.hu.shape == (count, first.Rows, first.Columns)
    assert volume.affine[:3, 3] == pytest.approx([float(v) for v in first.ImagePositionPatient])
    slice_spacing = float(sources[1].ImagePositionPatient[2]) - float(first.ImagePositionPatient[2])
    pixel_spacing = (float(first.PixelSpacing[0]), float(first.PixelSpacing[1]))
    assert volume.spacing == pytest.approx((slice_spacing, *pixel_spacing), rel=1e-3)
    assert volume.hu.min() >= -1024


def test_a_study_too_short_to_analyse_is_ignored_with_the_reason(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path
) -> None:
    node = node_factory(make_config(tmp_path))
    files = sorted(phantom_ct_series.iterdir())[:12]
    assert all(s.Status == 0 for s in _send(node, files))
    job = wait_for(lambda: next(iter(node.ledger.jobs(states=[JobState.IGNORED])), None), what="IGNORED")
    assert "12" in job.detail and "20" in job.detail, job.detail


def test_unknown_calling_ae_is_rejected_with_the_standard_reason(
    node_factory: Callable[[Config], Node], tmp_path: Path
) -> None:
    node = node_factory(make_config(tmp_path, listener={"allowed_calling_aes": ["PACS"]}))
    host, port = node.listener.address
    assoc = _scu("STRANGER").associate(host, port, ae_title="TRIAGED")
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)  # calling AE not recognised
    proc = subprocess.run(
        ["echoscu", "-aet", "STRANGER", "-aec", "TRIAGED", host, str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0 and "Calling AE Title Not Recognized" in proc.stderr + proc.stdout
    assoc = _scu("PACS").associate(host, port, ae_title="TRIAGED")
    assert assoc.is_established
    assoc.release()
    refused = [a for a in node.ledger.associations() if not a.accepted]
    assert len(refused) == 2 and "STRANGER" in refused[0].reject_reason


def test_a_source_outside_the_allowed_networks_is_rejected(
    node_factory: Callable[[Config], Node], tmp_path: Path
) -> None:
    node = node_factory(make_config(tmp_path, listener={"allowed_networks": ["10.99.0.0/16"]}))
    assoc = _scu().associate(*node.listener.address, ae_title="TRIAGED")
    # Issue 12 item 2: closed right after accept (no A-ASSOCIATE-RJ: that would need the request read).
    assert not assoc.is_established
    [refused] = node.ledger.audit_events(kinds=["association.refused"])
    assert refused.peer.startswith("127.0.0.1:") and "allowed_networks" in str(refused.detail["reason"])


def test_an_association_calling_another_ae_title_is_rejected_unless_any_is_accepted(
    node_factory: Callable[[Config], Node], tmp_path: Path
) -> None:
    # Issue 12 item 13: the called AE title was not checked; an association calling any title was accepted.
    require_tool("echoscu")
    node = node_factory(make_config(tmp_path))
    host, port = node.listener.address
    assoc = _scu().associate(host, port, ae_title="ANY-SCP")
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x07)  # called AE not recognised
    proc = subprocess.run(["echoscu", host, str(port)], capture_output=True, text=True, timeout=30)  # ANY-SCP
    assert proc.returncode != 0 and "Called AE Title Not Recognized" in proc.stderr + proc.stdout
    refused = node.ledger.associations()
    assert len(refused) == 2 and all(not a.accepted and "'ANY-SCP'" in a.reject_reason for a in refused)
    assoc = _scu().associate(host, port, ae_title="TRIAGED")
    assert assoc.is_established
    assoc.release()
    # listener.accept_any_called_ae (reloadable) accepts any called AE title again, for new associations.
    node.service.reload(node.config.listener.model_copy(update={"accept_any_called_ae": True}))
    assoc = _scu().associate(host, port, ae_title="ANY-SCP")
    assert assoc.is_established
    assoc.release()


def _first_file(series: Path) -> Path:
    return sorted(series.iterdir())[0]


def _ct(series: Path) -> Dataset:
    return dcmread(_first_file(series))


def test_bad_datasets_get_documented_statuses_are_quarantined_and_the_node_keeps_serving(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path
) -> None:
    node = node_factory(make_config(tmp_path))
    no_study = _ct(phantom_ct_series)
    no_study.SOPInstanceUID = generate_uid()
    del no_study.StudyInstanceUID
    hostile = _ct(phantom_ct_series)
    hostile.SOPInstanceUID = generate_uid()
    hostile.SeriesInstanceUID = "1.2/../../../etc"
    truncated = _ct(phantom_ct_series)
    truncated.SOPInstanceUID = generate_uid()
    truncated.PixelData = truncated.PixelData[: len(truncated.PixelData) // 2]
    statuses = [int(s.Status) for s in _send(node, [no_study, hostile, truncated])]
    assert statuses == [STATUS_INVALID_UID, STATUS_INVALID_UID, STATUS_TRUNCATED_PIXELS]

    # Garbage after a valid file meta header, sent raw (pynetdicom does not decode chunked sends).
    good = _first_file(phantom_ct_series)
    garbage = tmp_path / "garbage.dcm"
    meta = DicomBytesIO()
    write_file_meta_info(meta, dcmread(good, stop_before_pixels=True).file_meta)
    garbage.write_bytes(
        b"\0" * 128 + b"DICM" + meta.getvalue() + b"\x08\x00\x16\x00UI\xff\xff" + b"\xfe" * 64
    )
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        [rsp] = _send(node, [garbage])
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert int(rsp.Status) == STATUS_UNDECODABLE, rsp

    reasons = [r for _, r in node.spool.quarantined()]
    assert len(reasons) == 4
    assert any("StudyInstanceUID is missing" in r for r in reasons)
    assert any("not a valid UID" in r for r in reasons)
    assert not list((node.spool.root / "studies").rglob("*etc*"))
    # Still serving: a good instance is stored.
    [ok] = _send(node, [_ct(phantom_ct_series)])
    assert ok.Status == 0
    assert node.ledger.studies()[0].instances == 1


def test_a_dataset_whose_uid_differs_from_the_request_is_refused(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path
) -> None:
    node = node_factory(make_config(tmp_path))
    host, port = node.listener.address
    assoc = _scu().associate(host, port, ae_title="TRIAGED")
    # pynetdicom takes the request's Affected SOP Instance UID from the file meta of a file it sends
    # raw, so a file whose meta names another instance puts the mismatch on the wire.
    raw = _first_file(phantom_ct_series).read_bytes()
    uid = str(dcmread(_first_file(phantom_ct_series)).SOPInstanceUID).encode()
    other = uid[:-1] + (b"1" if uid[-1:] != b"1" else b"2")
    path = tmp_path / "mismatch.dcm"
    path.write_bytes(raw.replace(uid, other, 1))  # the first occurrence is in the file meta
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        rsp = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()
    assert int(rsp.Status) == STATUS_INSTANCE_MISMATCH


def test_a_non_image_sop_class_that_is_not_configured_is_not_negotiated(
    node_factory: Callable[[Config], Node], tmp_path: Path
) -> None:
    node = node_factory(make_config(tmp_path))
    ae = _scu(contexts=[BasicTextSRStorage, CTImageStorage])
    assoc = ae.associate(*node.listener.address, ae_title="TRIAGED")
    assert assoc.is_established
    rejected = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts}
    assoc.release()
    assert rejected == {BasicTextSRStorage: 0x03}  # abstract syntax not supported (PS3.8 9.3.3.2)


def test_configured_extra_sop_classes_are_stored_but_never_analysed(
    node_factory: Callable[[Config], Node], tmp_path: Path
) -> None:
    node = node_factory(make_config(tmp_path, listener={"extra_storage_sop_classes": ["BasicTextSRStorage"]}))
    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.SOPClassUID = BasicTextSRStorage
    sr.SOPInstanceUID = generate_uid()
    sr.StudyInstanceUID = generate_uid()
    sr.SeriesInstanceUID = generate_uid()
    sr.Modality = "SR"
    host, port = node.listener.address
    assoc = _scu(contexts=[BasicTextSRStorage]).associate(host, port, ae_title="TRIAGED")
    assert assoc.send_c_store(sr).Status == 0
    assoc.release()
    job = wait_for(lambda: next(iter(node.ledger.jobs(states=[JobState.IGNORED])), None), what="IGNORED")
    assert "no axial CT series" in job.detail


def test_a_full_disk_answers_out_of_resources_and_stores_nothing(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path
) -> None:
    node = node_factory(make_config(tmp_path, storage={"min_free_mb": 10**9}))
    [rsp] = _send(node, [_ct(phantom_ct_series)])
    assert int(rsp.Status) == STATUS_OUT_OF_RESOURCES
    # A short generic comment: the spool's path and free space stay in our log (issue 12 item 12).
    assert rsp.ErrorComment == "cannot store now; retry later"
    assert node.ledger.studies() == []


def test_duplicates_are_acknowledged_once_and_a_late_instance_reopens_the_study(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path
) -> None:
    # The first analysis hangs, so the late instance finds the first job still running.
    node = node_factory(make_config(tmp_path, analysis={"default_pipeline": "hang"}))
    files = sorted(phantom_ct_series.iterdir())  # all but the last still make an analysable series
    assert all(s.Status == 0 for s in _send(node, files[:-1]))
    assert all(s.Status == 0 for s in _send(node, files[:3]))  # re-sent: identical bytes
    first = wait_for(lambda: next(iter(node.ledger.jobs(states=[JobState.ANALYSING])), None), what="ANALYSING")
    assert node.ledger.studies()[0].instances == len(files) - 1
    assert all(s.Status == 0 for s in _send(node, files[-1:]))  # the late one
    # The superseded analysis is cancelled, so the worker takes the new revision.
    second = wait_for(
        lambda: next((j for j in node.ledger.jobs(states=[JobState.ANALYSING]) if j.id != first.id), None),
        what="the re-opened study to be analysed once the superseded analysis is cancelled",
    )
    assert second.revision == first.revision + 1
    assert node.ledger.job(first.id).state is JobState.SUPERSEDED
    assert node.ledger.studies()[0].instances == len(files)


def test_compressed_transfer_syntaxes_are_accepted(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path
) -> None:
    # (encoder command or None for pydicom's JPEG 2000 encoder, storescu option proposing that syntax)
    encoders = [(["dcmcjpeg", "+e1"], "-xs"), (["dcmcjpls"], "-xt"), (["dcmcrle"], "-xr"), (None, "-xv")]
    node = node_factory(make_config(tmp_path))
    sources = sorted(phantom_ct_series.iterdir())
    for i, ((encoder, propose), src) in enumerate(zip(encoders, sources, strict=False)):
        out = tmp_path / f"compressed-{i}.dcm"
        if encoder is None:
            ds = dcmread(src)
            ds.compress(JPEG2000Lossless)
            ds.save_as(out)
        else:
            require_tool(encoder[0])
            subprocess.run([*encoder, str(src), str(out)], check=True, capture_output=True)
        proc = storescu(*node.listener.address, [out], extra=[propose])
        assert proc.returncode == 0, proc.stderr
    study = node.ledger.studies()[0]
    stored = {
        dcmread(node.spool.root / p).file_meta.TransferSyntaxUID
        for p, *_ in node.ledger.study_instances(study.study_instance_uid)
    }
    assert stored == {JPEGLosslessSV1, JPEGLSLossless, RLELossless, JPEG2000Lossless}


def test_a_restart_keeps_every_acknowledged_instance_and_the_ledger_state(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path
) -> None:
    config = make_config(tmp_path, completion={"delay_seconds": 600})
    node = node_factory(config)
    assert all(s.Status == 0 for s in _send(node, sorted(phantom_ct_series.iterdir())[:5]))
    node.stop(drain_seconds=2)
    # A power loss after the fsync of a file but before its ledger row: the reconcile records it.
    late = _ct(phantom_ct_series)
    src = sorted(phantom_ct_series.iterdir())[5]
    rel = f"studies/{late.StudyInstanceUID}/{late.SeriesInstanceUID}/{dcmread(src).SOPInstanceUID}.dcm"
    shutil.copy(src, config.storage.spool / rel)
    again = node_factory(config)
    [study] = again.ledger.studies()
    assert study.instances == 6
    assert len(again.ledger.study_instances(study.study_instance_uid)) == 6
    assert [j.state for j in again.ledger.jobs()] == [JobState.RECEIVING]


def _send_files(node: Node, items: list[Dataset | Path]) -> list[int]:
    """C-STORE each item on one association; files go raw (their file meta picks the context)."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage, [JPEGLosslessSV1])
    assoc = ae.associate(*node.listener.address, ae_title="TRIAGED")
    assert assoc.is_established
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        rsps = [assoc.send_c_store(item) for item in items]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()
    root = str(node.spool.root)
    for rsp in rsps:  # what goes to a peer names none of our paths (issue 12 item 12)
        assert root not in str(rsp.get("ErrorComment", ""))
    return [int(rsp.Status) for rsp in rsps]


def _file_with_body(path: Path, ds: Dataset, meta_syntax: str, *, implicit: bool) -> Path:
    """``ds`` encoded as ``implicit`` says behind a file meta that names ``meta_syntax``: a mislabelled file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = meta_syntax
    head = DicomBytesIO()
    write_file_meta_info(head, meta)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, implicit
    write_dataset(body, ds)
    path.write_bytes(b"\0" * 128 + b"DICM" + head.getvalue() + body.getvalue())
    return path


def test_a_series_or_instance_recorded_elsewhere_is_refused_for_good_and_the_node_still_restarts(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path
) -> None:
    # Issue 12 item 1: a PACS split/merge re-uses a Series or SOP Instance UID under another study or
    # series.  It used to be spooled, answered 0xA700 (retried for ever) and stop every restart.
    config = make_config(tmp_path, completion={"delay_seconds": 600})
    node = node_factory(config)
    files = sorted(phantom_ct_series.iterdir())
    first = dcmread(files[0])
    merged = dcmread(files[1])
    merged.StudyInstanceUID = generate_uid()  # same series, another study
    split = dcmread(files[0])
    split.SeriesInstanceUID = generate_uid()  # same SOP Instance, another series
    rsps = _send(node, [first, merged, split])
    assert [int(r.Status) for r in rsps] == [0, STATUS_UID_CONFLICT, STATUS_UID_CONFLICT]
    assert all(r.ErrorComment.startswith("UID conflict") for r in rsps[1:])
    assert (
        str(node.spool.root) not in rsps[1].ErrorComment
        and first.StudyInstanceUID not in rsps[1].ErrorComment
    )
    stored = list((node.spool.root / "studies").rglob("*.dcm"))
    assert [p.name for p in stored] == [f"{first.SOPInstanceUID}.dcm"]  # nothing written for the refused
    reasons = [r for _, r in node.spool.quarantined()]
    assert len(reasons) == 2 and all("0xC214" in r for r in reasons)
    assert "already recorded under study" in reasons[0] and "already recorded in series" in reasons[1]
    # the association's counts are written when the node handles the release, which may come after the
    # SCU's release returned (a CI run read the row before that: (0, 0))
    wait_for(lambda: [(a.instances, a.failures) for a in node.ledger.associations()] == [(1, 2)],
             what="the association's counts")
    node.stop(drain_seconds=2)
    again = node_factory(config)
    [study] = again.ledger.studies()
    assert (study.study_instance_uid, study.instances) == (first.StudyInstanceUID, 1)


def test_broken_and_mislabelled_datasets_get_specific_statuses_and_are_quarantined(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path
) -> None:
    # Issue 12 item 12: each of these was answered Success and stored as a broken or mislabelled file.
    node = node_factory(make_config(tmp_path))
    source = _first_file(phantom_ct_series)
    raw = source.read_bytes()

    def fresh() -> Dataset:
        ds = dcmread(source)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return ds

    cut = fresh()
    cut_file = tmp_path / "cut.dcm"
    cut.save_as(cut_file)
    data = cut_file.read_bytes()
    cut_file.write_bytes(data[: data.rindex(b"\xe0\x7f\x10\x00")])  # the stream ends at the Pixel Data tag
    no_pixels = fresh()
    del no_pixels.PixelData
    implicit_on_explicit = _file_with_body(
        tmp_path / "implicit.dcm", fresh(), ExplicitVRLittleEndian, implicit=True
    )
    native_on_jpeg = _file_with_body(tmp_path / "native.dcm", fresh(), JPEGLosslessSV1, implicit=False)
    newline = tmp_path / "newline.dcm"
    ds = fresh()
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.99.70"  # 25 characters and a pad byte on the wire ...
    ds.save_as(newline)
    # ... become a UID ending in a newline, which pydicom strips when it decodes the value.
    newline.write_bytes(
        newline.read_bytes().replace(b"1.2.826.0.1.3680043.99.70\0", b"1.2.826.0.1.3680043.99.70\n")
    )
    statuses = _send_files(node, [cut_file, no_pixels, implicit_on_explicit, native_on_jpeg, newline])
    assert statuses == [
        STATUS_MISSING_PIXELS,
        STATUS_MISSING_PIXELS,
        STATUS_ENCODING_MISMATCH,
        STATUS_ENCODING_MISMATCH,
        STATUS_INVALID_UID,
    ]
    reasons = [r for _, r in node.spool.quarantined()]
    assert len(reasons) == 5
    assert sum("0xC215" in r for r in reasons) == 2 and sum("0xC216" in r for r in reasons) == 2
    assert any("Implicit VR dataset on a 1.2.840.10008.1.2.1" in r for r in reasons)
    assert any(f"native Pixel Data on a {JPEGLosslessSV1}" in r for r in reasons)
    assert not list((node.spool.root / "studies").rglob("*"))
    # The well-formed ones of each kind still go through.
    assert raw and _send_files(node, [source]) == [0]
    good_implicit = _file_with_body(
        tmp_path / "good-implicit.dcm", fresh(), ImplicitVRLittleEndian, implicit=True
    )
    ae = _scu()
    ae.add_requested_context(CTImageStorage, [ImplicitVRLittleEndian])
    assoc = ae.associate(*node.listener.address, ae_title="TRIAGED")
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assert assoc.send_c_store(good_implicit).Status == 0
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()
    assert node.ledger.studies()[0].instances == 2


def test_a_ledger_error_answers_retry_later_without_the_database_message(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path
) -> None:
    # Issue 12 item 12: the Error Comment carried SQLite's message (and with it our paths) to the peer.
    config = make_config(tmp_path)
    node = node_factory(config)
    con = sqlite3.connect(config.storage.ledger)
    try:
        con.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON instances "
            "BEGIN SELECT RAISE(ABORT, 'disk I/O error in /var/lib/triaged/secret'); END"
        )
        con.commit()
    finally:
        con.close()
    [rsp] = _send(node, [_ct(phantom_ct_series)])
    assert int(rsp.Status) == STATUS_OUT_OF_RESOURCES
    assert rsp.ErrorComment == "cannot store now; retry later"


# ------------------------------------------------------------------ issue 12 items 10 and 11


def test_a_disk_full_while_writing_results_waits_for_a_retry_instead_of_failing_for_good(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path
) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full to make a write fail with ENOSPC")
    node = node_factory(make_config(tmp_path))
    work = node.spool.work_dir(1)  # the first job of a fresh ledger
    work.mkdir(parents=True, exist_ok=True)
    (work / "masks.tmp.npz").symlink_to("/dev/full")  # the worker's first write: ENOSPC, as on a full disk
    assert all(s.Status == 0 for s in _send(node, sorted(phantom_ct_series.iterdir())))
    job = wait_for(
        lambda: next((j for j in node.ledger.jobs() if j.state is JobState.FAILED or "transient" in j.detail), None),
        timeout=60, what="the analysis to hit the full disk",
    )
    assert (job.id, job.state) == (1, JobState.QUEUED), job.detail  # was FAILED for good
    assert "No space left on device" in job.detail and "retry 1 of" in job.detail
    assert job.next_attempt_at is not None and job.next_attempt_at > datetime.now(UTC)


def test_the_nodes_own_results_forwarded_back_never_reopen_the_study(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path
) -> None:
    pacs = AE(ae_title="PACS")
    for cx in StoragePresentationContexts:
        pacs.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    server = pacs.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000)])
    try:
        node = node_factory(make_config(
            tmp_path,
            listener={"extra_storage_sop_classes": [
                "Comprehensive3DSRStorage", "SegmentationStorage", "SecondaryCaptureImageStorage"]},
            destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": server.server_address[1]}},
            routing={"default": {"destinations": ["pacs"]}},
            dispatch={"interval_seconds": 0.3},
        ))
        assert all(s.Status == 0 for s in _send(node, sorted(phantom_ct_series.iterdir())))
        job = wait_for(lambda: next(iter(node.ledger.jobs(states=[JobState.DONE])), None), timeout=120, what="DONE")
    finally:
        server.shutdown()
    outputs = [node.spool.absolute(i.path) for i in node.ledger.outbox(job_id=job.id)]
    headers = [dcmread(p, stop_before_pixels=True) for p in outputs]
    sr, seg, sc = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.7"
    assert {str(h.SOPClassUID) for h in headers} == {sr, seg, sc}
    instances, outbox = node.ledger.studies()[0].instances, len(node.ledger.outbox(limit=1000))
    # The PACS forwards the study back twice, the second time with an attribute it coerced.
    for forward in range(2):
        back = AE(ae_title="PACS")
        for h in headers:
            back.add_requested_context(h.SOPClassUID, [h.file_meta.TransferSyntaxUID])
        assoc = back.associate(*node.listener.address, ae_title="TRIAGED")
        assert assoc.is_established
        try:
            for path in outputs:
                ds = dcmread(path)
                if forward:
                    ds.InstitutionName = "PACS COERCED"
                assert assoc.send_c_store(ds).Status == 0
        finally:
            assoc.release()
    time.sleep(1.5)  # longer than the completion delay: a re-opened study would have moved on by now
    assert [(j.id, j.revision, j.state) for j in node.ledger.jobs()] == [(job.id, 1, JobState.DONE)]
    assert len(node.ledger.outbox(limit=1000)) == outbox
    assert node.ledger.studies()[0].instances == instances + len(outputs)  # stored: they belong to the study


def test_an_association_beyond_max_associations_is_rejected_logged_and_recorded(
    node_factory: Callable[[Config], Node], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Issue 12 item 14: pynetdicom's own refusal at the limit left no log line and no ledger row.
    node = node_factory(make_config(tmp_path, listener={"max_associations": 1}))
    host, port = node.listener.address
    held = _scu().associate(host, port, ae_title="TRIAGED")
    assert held.is_established
    try:
        extra = _scu("LATECOMER").associate(host, port, ae_title="TRIAGED")
        assert extra.is_rejected
        rj = extra.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)  # transient, local limit
        wait_for(lambda: any(not a.accepted for a in node.ledger.associations()), what="the refusal's row")
        [row] = [a for a in node.ledger.associations() if not a.accepted]
        assert (row.calling_ae, row.reject_reason) == ("LATECOMER", "association limit reached")
        assert "association limit reached" in caplog.text and "LATECOMER" in caplog.text
    finally:
        held.release()
    # a slot is free again once the node has ended the held association, which can come just after the
    # SCU's release returned (a CI run was refused here once)
    def associated() -> object:
        assoc = _scu().associate(host, port, ae_title="TRIAGED")
        return assoc if assoc.is_established else None

    again = wait_for(associated, timeout=10, what="a free association slot")
    again.release()
