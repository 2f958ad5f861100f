"""The dispatch stage with a real SQLite ledger and an injected clock: backoff, dead letters, settle, resend."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import make_config
from triaged.config import Config, DestinationConfig, DispatchConfig
from triaged.domain import InstanceRecord, JobState
from triaged.errors import DispatchError, TriagedError
from triaged.ledger import Ledger
from triaged.net.scu import SendResult, StopSignal
from triaged.routing import RouteDecision
from triaged.spool import Spool
from triaged.stages import Dispatch, backoff_seconds, retryable_status

CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.22"


class Peer:
    """A destination that answers each instance with the next status of a script (the Destination protocol)."""

    def __init__(self, *statuses: int | None, refuse_association: bool = False) -> None:
        self.statuses = list(statuses)
        self.refuse_association = refuse_association
        self.calls: list[tuple[list[Path], str, str]] = []

    def send(self, paths: Sequence[Path], dest: DestinationConfig, *, calling_ae: str, timeout: float,
             on_result: Callable[[SendResult], None], stop: StopSignal) -> list[SendResult]:
        self.calls.append((list(paths), dest.ae_title, calling_ae))
        if self.refuse_association:
            raise DispatchError(f"no association with {dest.ae_title}")
        results = [SendResult(str(p), p.stem, self.statuses.pop(0), "scripted") for p in paths]
        for result in results:
            on_result(result)
        return results


class Clock:
    """The injected ``now``: a time the test sets."""

    def __init__(self) -> None:
        self.at = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.at


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(
        tmp_path,
        destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 11112}},
        dispatch={"base_delay_seconds": 10, "multiplier": 2, "max_delay_seconds": 600, "max_age_hours": 24},
    )


@pytest.fixture
def ledger(config: Config) -> Iterator[Ledger]:
    led = Ledger(config.storage.ledger)
    yield led
    led.close()


def encoding_job(ledger: Ledger, destinations: list[dict[str, object]]) -> int:
    """A job driven to ENCODING through the ledger's own API, routed to ``destinations``."""
    ledger.record_instance(InstanceRecord("1.2.3", "1.2.3.4", "1.2.3.4.1", CT, "1.2.840.10008.1.2.1",
                                          "studies/1.2.3/1.2.3.4/1.2.3.4.1.dcm", 10, "0" * 64),
                           association_id=None)
    (job,) = ledger.jobs()
    ledger.transition(job.id, JobState.RECEIVING, JobState.COMPLETE)
    route = RouteDecision.from_json(json.dumps({"pipelines": ["ok"], "destinations": destinations}))
    ledger.queue_job(job.id, route=route, pipeline="ok", series_instance_uid="1.2.3.4", detail="")
    ledger.transition(job.id, JobState.QUEUED, JobState.ANALYSING)
    ledger.transition(job.id, JobState.ANALYSING, JobState.ENCODING)
    return job.id


OUTPUTS = (("sr", "work/1/outputs/sr-1.2.9.1.dcm", SR, "1.2.9.1"), ("sc", "work/1/outputs/sc-1.2.9.2.dcm", CT, "1.2.9.2"))


def dispatching(ledger: Ledger, dispatch: Dispatch, outputs: str = "every") -> int:
    dest: dict[str, object] = {"name": "pacs", "outputs": ["sr", "seg", "sc"] if outputs == "every" else [outputs]}
    job_id = encoding_job(ledger, [dest])
    dispatch.enqueue_outputs(ledger.job(job_id), OUTPUTS)
    return job_id


def test_backoff_is_exponential_from_the_base_delay_and_capped() -> None:
    d = DispatchConfig(base_delay_seconds=10, multiplier=2, max_delay_seconds=600)
    assert [backoff_seconds(n, d) for n in range(8)] == [10, 20, 40, 80, 160, 320, 600, 600]
    assert backoff_seconds(50, d) == 600
    assert backoff_seconds(3, DispatchConfig(base_delay_seconds=5, multiplier=1, max_delay_seconds=600)) == 5


def test_only_out_of_resources_statuses_are_retried() -> None:
    assert [retryable_status(s) for s in (0xA700, 0xA7FF, 0xA900, 0xC000, 0x0122)] == [True, True, False, False, False]


def test_outputs_go_to_the_outbox_by_the_kinds_each_destination_takes(config: Config, ledger: Ledger) -> None:
    dispatch = Dispatch(ledger, Spool(config.storage.spool), lambda: config, destination=Peer())
    job_id = dispatching(ledger, dispatch, outputs="sr")
    assert [(i.destination, i.kind, i.state) for i in ledger.outbox(job_id=job_id)] == [("pacs", "sr", "PENDING")]
    assert ledger.job(job_id).state is JobState.DISPATCHING


def test_a_job_without_destinations_settles_done_at_once(config: Config, ledger: Ledger) -> None:
    dispatch = Dispatch(ledger, Spool(config.storage.spool), lambda: config, destination=Peer())
    job_id = encoding_job(ledger, [])
    dispatch.enqueue_outputs(ledger.job(job_id), OUTPUTS)
    job = ledger.job(job_id)
    assert (job.state, job.detail) == (JobState.DONE, "findings recorded; no destination")


def test_a_delivered_job_settles_done(config: Config, ledger: Ledger) -> None:
    peer = Peer(0x0000, 0xB000)  # success, and a warning (stored with coercion) counts as delivered
    dispatch = Dispatch(ledger, Spool(config.storage.spool), lambda: config, destination=peer)
    job_id = dispatching(ledger, dispatch)
    assert dispatch.dispatch_due() == 2
    job = ledger.job(job_id)
    assert (job.state, job.detail) == (JobState.DONE, "2 object(s) delivered to pacs")
    assert [p.name for p in peer.calls[0][0]] == ["sr-1.2.9.1.dcm", "sc-1.2.9.2.dcm"]
    assert peer.calls[0][1:] == ("PACS", "TRIAGED")


def test_a_busy_destination_schedules_the_next_attempt_by_backoff_and_the_job_waits(
    config: Config, ledger: Ledger
) -> None:
    peer = Peer(0xA700, 0x0000, 0xA702)
    dispatch = Dispatch(ledger, Spool(config.storage.spool), lambda: config, destination=peer)
    job_id = dispatching(ledger, dispatch)
    created = ledger.outbox(job_id=job_id)[0].created_at
    first = created + timedelta(seconds=1)
    assert dispatch.dispatch_due(first) == 1
    job = ledger.job(job_id)
    assert job.state is JobState.RETRY_WAIT
    assert job.next_attempt_at == first + timedelta(seconds=10)
    assert job.detail.startswith("1 of 2 delivered; next attempt")
    # Not due yet: nothing is sent; then due: the second failure waits twice as long.
    assert dispatch.dispatch_due(first + timedelta(seconds=5)) == 0
    assert len(peer.calls) == 1
    second = first + timedelta(seconds=10)
    assert dispatch.dispatch_due(second) == 0
    (pending,) = ledger.outbox(job_id=job_id, states=["PENDING"])
    assert (pending.attempts, pending.next_attempt_at, pending.last_status) == (2, second + timedelta(seconds=20), 0xA702)
    assert ledger.job(job_id).state is JobState.RETRY_WAIT


def test_an_item_failing_past_the_maximum_age_is_dead_lettered_and_the_job_fails(
    config: Config, ledger: Ledger
) -> None:
    clock = Clock()
    dispatch = Dispatch(ledger, Spool(config.storage.spool), lambda: config,
                        destination=Peer(refuse_association=True), now=clock)
    job_id = dispatching(ledger, dispatch, outputs="sr")
    created = ledger.outbox(job_id=job_id)[0].created_at
    clock.at = created + timedelta(hours=23, minutes=59)
    dispatch.dispatch_due()
    assert ledger.outbox(job_id=job_id)[0].state == "PENDING"
    assert ledger.job(job_id).state is JobState.RETRY_WAIT
    clock.at = created + timedelta(hours=24, minutes=1)
    dispatch.dispatch_due()
    (item,) = ledger.outbox(job_id=job_id)
    assert item.state == "DEAD"
    assert item.last_error.startswith("no success for 24 h (2 attempts); last error: no association with PACS")
    job = ledger.job(job_id)
    assert job.state is JobState.FAILED
    assert job.detail.startswith("dispatch: 1 object(s) dead-lettered")


def test_a_permanent_refusal_is_dead_lettered_at_once(config: Config, ledger: Ledger) -> None:
    dispatch = Dispatch(ledger, Spool(config.storage.spool), lambda: config, destination=Peer(0xC000))
    job_id = dispatching(ledger, dispatch, outputs="sr")
    dispatch.dispatch_due(datetime.now(UTC))
    (item,) = ledger.outbox(job_id=job_id)
    assert (item.state, item.last_error) == ("DEAD", "pacs refused sr with 0xC000 scripted")
    assert ledger.job(job_id).state is JobState.FAILED


def test_a_destination_no_longer_configured_is_retried_not_sent(config: Config, ledger: Ledger) -> None:
    peer = Peer()
    dispatch = Dispatch(ledger, Spool(config.storage.spool), lambda: config, destination=peer)
    job_id = encoding_job(ledger, [{"name": "gone", "outputs": ["sr"]}])
    dispatch.enqueue_outputs(ledger.job(job_id), OUTPUTS)
    dispatch.dispatch_due(datetime.now(UTC))
    (item,) = ledger.outbox(job_id=job_id)
    assert (item.state, item.last_error) == ("PENDING", "destination 'gone' is not configured")
    assert peer.calls == []


def test_resend_puts_a_finished_jobs_outputs_back_and_refuses_a_job_before_encoding(
    config: Config, ledger: Ledger
) -> None:
    dispatch = Dispatch(ledger, Spool(config.storage.spool), lambda: config, destination=Peer(0x0000, 0x0000))
    job_id = dispatching(ledger, dispatch)
    dispatch.dispatch_due()
    assert ledger.job(job_id).state is JobState.DONE
    assert dispatch.resend(job_id) == 2
    assert ledger.job(job_id).state is JobState.DISPATCHING
    assert {i.state for i in ledger.outbox(job_id=job_id)} == {"PENDING"}
    ledger.record_instance(InstanceRecord("1.2.5", "1.2.5.4", "1.2.5.4.1", CT, "1.2.840.10008.1.2.1",
                                          "studies/1.2.5/1.2.5.4/1.2.5.4.1.dcm", 10, "0" * 64),
                           association_id=None)
    receiving = ledger.jobs(states=[JobState.RECEIVING])[0]
    with pytest.raises(TriagedError, match="only a job past encoding can be re-sent"):
        dispatch.resend(receiving.id)


class LostAfter(Peer):
    """Acknowledges the first ``n`` objects, then loses the connection (an ``OSError`` out of the send)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def send(self, paths: Sequence[Path], dest: DestinationConfig, *, calling_ae: str, timeout: float,
             on_result: Callable[[SendResult], None], stop: StopSignal) -> list[SendResult]:
        self.calls.append((list(paths), dest.ae_title, calling_ae))
        for p in paths[: self.n]:
            on_result(SendResult(str(p), p.stem, 0x0000))
        raise OSError("connection reset by peer")


def test_acknowledgements_before_a_lost_connection_stay_sent_and_only_the_rest_is_retried(
    config: Config, ledger: Ledger
) -> None:
    dispatch = Dispatch(ledger, Spool(config.storage.spool), lambda: config, destination=LostAfter(1))
    job_id = dispatching(ledger, dispatch)
    assert dispatch.dispatch_due() == 1
    first, second = ledger.outbox(job_id=job_id)
    assert (first.state, first.attempts, first.last_status) == ("SENT", 1, 0x0000)
    assert (second.state, second.attempts, second.last_error) == ("PENDING", 1, "connection reset by peer")
    job = ledger.job(job_id)
    assert job.state is JobState.RETRY_WAIT and job.detail.startswith("1 of 2 delivered")



class HeldPeer(Peer):
    """A peer that holds its first association until released (a busy destination)."""

    def __init__(self) -> None:
        super().__init__(*([0x0000] * 4))
        self.entered = threading.Event()
        self.release = threading.Event()

    def send(self, paths: Sequence[Path], dest: DestinationConfig, *, calling_ae: str, timeout: float,
             on_result: Callable[[SendResult], None], stop: StopSignal) -> list[SendResult]:
        if not self.entered.is_set():
            self.entered.set()
            self.release.wait(10)
        return super().send(paths, dest, calling_ae=calling_ae, timeout=timeout, on_result=on_result, stop=stop)


def _encoding_study(ledger: Ledger, n: int) -> int:
    """Like :func:`encoding_job`, for study ``1.2.3.<n>`` (several jobs in one ledger)."""
    study = f"1.2.3.{n}"
    ledger.record_instance(InstanceRecord(study, f"{study}.4", f"{study}.4.1", CT, "1.2.840.10008.1.2.1",
                                          f"studies/{study}/{study}.4/{study}.4.1.dcm", 10, "0" * 64),
                           association_id=None)
    (job,) = ledger.jobs(study_uid=study)
    ledger.transition(job.id, JobState.RECEIVING, JobState.COMPLETE)
    route = RouteDecision.from_json(json.dumps({"pipelines": ["ok"], "destinations": [{"name": "pacs", "outputs": ["sr", "sc"]}]}))
    ledger.queue_job(job.id, route=route, pipeline="ok", series_instance_uid=f"{study}.4", detail="")
    ledger.transition(job.id, JobState.QUEUED, JobState.ANALYSING)
    ledger.transition(job.id, JobState.ANALYSING, JobState.ENCODING)
    return job.id


def test_with_send_at_once_encoded_outputs_go_without_a_tick_and_a_busy_destination_takes_them_after(
    config: Config, ledger: Ledger
) -> None:
    peer = HeldPeer()
    dispatch = Dispatch(ledger, Spool(config.storage.spool), lambda: config, destination=peer, send_at_once=True)
    first = _encoding_study(ledger, 1)
    dispatch.enqueue_outputs(ledger.job(first), OUTPUTS)  # started at once: the peer holds the association
    assert peer.entered.wait(10)
    second = _encoding_study(ledger, 2)
    dispatch.enqueue_outputs(ledger.job(second), OUTPUTS)  # the destination is busy: it waits for the sender
    assert ledger.job(second).state is JobState.DISPATCHING and not peer.calls
    peer.release.set()
    deadline = time.monotonic() + 10
    while {ledger.job(first).state, ledger.job(second).state} != {JobState.DONE} and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (ledger.job(first).state, ledger.job(second).state) == (JobState.DONE, JobState.DONE)
    assert len(peer.calls) == 2  # one association per job, and no tick (dispatch_due, start_due) was called
