"""The Orthanc test peer itself: it receives DCMTK C-STOREs, answers REST, and survives a restart."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import require_tool
from tests.integration import orthanc as orthanc_helpers
from tests.integration.conftest import storescu
from tests.integration.orthanc import OrthancError, OrthancPeer

# The helper's fixtures, made visible to this module (assignment, so ruff sees no shadowed import).
orthanc = orthanc_helpers.orthanc
orthanc_factory = orthanc_helpers.orthanc_factory

pytestmark = pytest.mark.integration


def _three_slices(folder: Path) -> tuple[list[Path], str, set[str]]:
    files = sorted(folder.glob("*.dcm"))[:3]
    assert len(files) == 3, f"expected at least 3 slices in {folder}"
    headers = [dcmread(f, stop_before_pixels=True) for f in files]
    studies = {str(h.StudyInstanceUID) for h in headers}
    assert len(studies) == 1
    return files, studies.pop(), {str(h.SOPInstanceUID) for h in headers}


def _store(peer: OrthancPeer, files: list[Path]) -> None:
    require_tool("storescu")
    result = storescu("127.0.0.1", peer.dicom_port, files, aec=peer.aet)
    assert result.returncode == 0, result.stdout + result.stderr


def test_receives_dcmtk_cstore_and_lists_instances(phantom_ct_series: Path, orthanc: OrthancPeer) -> None:
    files, study_uid, sop_uids = _three_slices(phantom_ct_series)
    assert orthanc.count_instances() == 0
    assert orthanc.echo_ok()

    _store(orthanc, files)

    instances = orthanc.instances_of_study(study_uid)
    assert len(instances) == 3
    assert {i["MainDicomTags"]["SOPInstanceUID"] for i in instances} == sop_uids
    assert orthanc.count_instances() == 3
    assert len(orthanc.studies()) == 1

    first = instances[0]
    tags = orthanc.instance_tags(first["ID"])
    assert tags["StudyInstanceUID"] == study_uid
    assert tags["SOPInstanceUID"] == first["MainDicomTags"]["SOPInstanceUID"]
    stored = orthanc.instance_file(first["ID"])
    assert stored[128:132] == b"DICM"
    assert orthanc.instances_of_study("1.2.3.4.5.6.7.8.9") == []


def test_restart_on_same_folder_keeps_instances(phantom_ct_series: Path, orthanc: OrthancPeer) -> None:
    files, study_uid, sop_uids = _three_slices(phantom_ct_series)
    _store(orthanc, files)
    assert orthanc.sop_instance_uids(study_uid) == sop_uids
    pid = orthanc.pid

    orthanc.stop()
    assert not orthanc.running
    assert not orthanc.echo_ok(), "C-ECHO succeeded while Orthanc was stopped"

    orthanc.start()
    assert orthanc.pid != pid
    assert orthanc.echo_ok(), "C-ECHO failed after the restart"
    assert orthanc.sop_instance_uids(study_uid) == sop_uids
    assert orthanc.count_instances() == 3


def test_start_failure_reports_log(tmp_path: Path) -> None:
    """A port already taken makes start() fail fast with Orthanc's log, not hang until the deadline."""
    require_tool("Orthanc")
    with OrthancPeer(tmp_path / "first") as first:
        second = OrthancPeer(tmp_path / "second", dicom_port=first.dicom_port, startup_timeout=15)
        with pytest.raises(OrthancError, match="while starting") as info:
            second.start()
        assert not second.running
        assert "already in use" in str(info.value)  # the log tail rides along
