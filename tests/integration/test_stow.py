"""STOW-RS destination against a real Orthanc with its DICOMweb plugin (Debian ``orthanc-dicomweb``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import make_config
from tests.integration import orthanc as orthanc_helpers
from tests.integration.conftest import dispatching_job, wait_for
from triaged.domain import JobState
from triaged.ledger import Ledger
from triaged.spool import Spool
from triaged.stages import Dispatch

pytestmark = pytest.mark.integration
orthanc_factory = orthanc_helpers.orthanc_factory


@pytest.fixture
def dicomweb(orthanc_factory: orthanc_helpers.OrthancFactory) -> orthanc_helpers.OrthancPeer:
    plugin = orthanc_helpers.dicomweb_plugin()
    if plugin is None:
        pytest.skip("Orthanc's DICOMweb plugin is not installed (apt-get install -y orthanc-dicomweb)")
    return orthanc_factory("dicomweb", plugins=[plugin])


def test_result_objects_arrive_in_orthanc_by_stow_rs(
    dicomweb: orthanc_helpers.OrthancPeer, tmp_path: Path, phantom_ct_series: Path
) -> None:
    files = sorted(phantom_ct_series.iterdir())[:3]
    config = make_config(
        tmp_path,
        destinations={
            "web": {"type": "stow-rs", "url": f"{dicomweb.url}/dicom-web/"},
            "gone": {"type": "stow-rs", "url": f"{dicomweb.url}/no-such-service", "timeout_seconds": 5},
        },
        dispatch={"base_delay_seconds": 0.5, "max_delay_seconds": 1},
    )
    with Ledger(config.storage.ledger) as ledger:
        dispatch = Dispatch(ledger, Spool(config.storage.spool), lambda: config)
        try:
            study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            job, outputs = dispatching_job(ledger, config.storage.spool, study, files, ["web"])
            dispatch.enqueue_outputs(ledger.job(job), outputs)
            assert dispatch.dispatch_due() == 3
            wait_for(lambda: ledger.job(job).state is JobState.DONE, timeout=5, what="the job delivered")
            assert dicomweb.sop_instance_uids(study) == {o[3] for o in outputs}
            assert {(i.state, i.last_status) for i in ledger.outbox(job_id=job)} == {("SENT", 200)}
            # A URL that is no DICOMweb service answers 404: dead-lettered at once, with the reason.
            other = "1.2.826.0.9.77"
            job2, outputs2 = dispatching_job(ledger, config.storage.spool, other, files[:1], ["gone"])
            dispatch.enqueue_outputs(ledger.job(job2), outputs2)
            assert dispatch.dispatch_due() == 0
            (item,) = ledger.outbox(job_id=job2)
            assert item.state == "DEAD" and "HTTP 404" in item.last_error, item.last_error
            assert ledger.job(job2).state is JobState.FAILED
        finally:
            dispatch.stop()
