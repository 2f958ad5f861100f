"""The four scenarios of ``make soak`` and the totals they add up to."""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset

from soak import corpus
from soak.node import HungPeer, Node, NodeDied, Storescp, echo, free_port, node_settings
from soak.senders import Instance, Sender, body_sha256, write_study

#: The systemd unit whose TimeoutStopSec a SIGTERM must beat.
UNIT = Path(__file__).resolve().parent.parent / "systemd" / "triaged.service"
DEST = "soakpacs"


@dataclass(frozen=True)
class Params:
    """How much of everything: :data:`SHORT` inside ``make test``, :data:`LONG` for ``make soak``."""

    studies_per_sender: int
    kills: int
    between_studies: float
    mutations: int
    full_disk_studies: int
    quiet_timeout: float


SHORT = Params(
    studies_per_sender=1, kills=1, between_studies=0.5, mutations=160, full_disk_studies=1, quiet_timeout=60
)
LONG = Params(
    studies_per_sender=8,
    kills=12,
    between_studies=10.0,
    mutations=700,
    full_disk_studies=4,
    quiet_timeout=240,
)


@dataclass
class Totals:
    """What the suite did and found; :meth:`ok` is false when any promise failed."""

    kills: int = 0
    dispatch_kills: int = 0
    acknowledged: int = 0
    lost: int = 0
    duplicates: int = 0
    undelivered: int = 0
    malformed: int = 0
    node_alive: bool = True
    max_rss_mib: float = 0.0
    rss_growth_mib: float = 0.0
    full_disk_refusals: int = 0
    healthy_latency_s: float = 0.0
    stop_seconds: float = 0.0
    jobs: Counter[str] = field(default_factory=Counter)
    outcomes: dict[str, Counter[str]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def merge(self, other: Totals) -> None:
        """Add a scenario's totals (run in its own thread) to these."""
        for name in (
            "kills",
            "dispatch_kills",
            "acknowledged",
            "lost",
            "duplicates",
            "undelivered",
            "malformed",
            "full_disk_refusals",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("max_rss_mib", "rss_growth_mib", "healthy_latency_s", "stop_seconds"):
            setattr(self, name, max(getattr(self, name), getattr(other, name)))
        self.node_alive = self.node_alive and other.node_alive
        self.jobs.update(other.jobs)
        self.outcomes.update(other.outcomes)
        self.failures += other.failures
        self.notes += other.notes

    def ok(self) -> bool:
        return not self.failures

    def fail(self, what: str) -> None:
        print(f"FAILED: {what}", flush=True)
        self.failures.append(what)

    def note(self, what: str) -> None:
        print(what, flush=True)
        self.notes.append(what)

    def summary(self) -> str:
        lines = [
            f"faults injected (kill -9): {self.kills} ({self.dispatch_kills} during dispatch)   "
            f"instances acknowledged: {self.acknowledged}   lost: {self.lost}   "
            f"duplicate deliveries: {self.duplicates}   undelivered results: {self.undelivered}",
            f"malformed inputs tried: {self.malformed}   node alive: {'yes' if self.node_alive else 'NO'}   "
            f"max node RSS: {self.max_rss_mib:.0f} MiB (+{self.rss_growth_mib:.0f} MiB under attack)   "
            f"full-disk refusals: {self.full_disk_refusals}",
            f"healthy destination next to a hung one: results {self.healthy_latency_s:.1f} s after the last "
            f"image   SIGTERM stop: {self.stop_seconds:.1f} s (TimeoutStopSec {timeout_stop_sec()} s)   "
            f"jobs: {dict(sorted(self.jobs.items()))}",
        ]
        for category, counts in self.outcomes.items():
            lines.append(f"  {category}: " + ", ".join(f"{k} ×{v}" for k, v in counts.most_common()))
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  FAILED: {f}" for f in self.failures]
        lines.append("all promises held" if self.ok() else f"{len(self.failures)} promise(s) failed")
        return "\n".join(lines)


def timeout_stop_sec() -> int:
    """TimeoutStopSec of the repository's systemd unit (90, systemd's default, when it is not set)."""
    found = re.search(r"^TimeoutStopSec=(\d+)", UNIT.read_text(), re.MULTILINE) if UNIT.is_file() else None
    return int(found.group(1)) if found else 90


# -- checks shared by the scenarios ------------------------------------------------------------------
def check_acknowledged(node: Node, acked: dict[str, str], totals: Totals, where: str) -> int:
    """Every acknowledged instance in the ledger and the spool with the bytes that were sent; lost count."""
    recorded = node.instances()
    lost = []
    for uid, sha in acked.items():
        row = recorded.get(uid)
        if row is None:
            lost.append(f"{uid}: no ledger row")
            continue
        path = node.spool / row[0]
        try:
            if body_sha256(path.read_bytes()) != sha:
                lost.append(f"{uid}: spool bytes differ from what was sent")
        except OSError as exc:
            lost.append(f"{uid}: {exc}")
    if lost:
        totals.fail(f"{where}: {len(lost)} acknowledged instance(s) lost, e.g. {lost[:3]}")
    return len(lost)


def check_finished(node: Node, totals: Totals, where: str, timeout: float) -> None:
    """Quiescence: each study's newest job terminal (DONE expected), no result waiting, no temp files."""
    if not node.wait_quiescent(timeout):
        open_jobs = [j for j in node.current_jobs() if j[2] not in {"DONE", "IGNORED", "FAILED"}]
        totals.fail(f"{where}: not quiescent after {timeout:.0f} s: {open_jobs[:5]}")
    for study, revision, state, detail in node.current_jobs():
        if state != "DONE":
            totals.fail(f"{where}: study {study} revision {revision} ended {state}: {detail}")
    totals.jobs.update(node.job_states())
    if leftovers := node.leftovers():
        totals.fail(f"{where}: temp files left in the spool: {[str(p) for p in leftovers[:5]]}")


def check_delivery(node: Node, dest: Storescp, totals: Totals, where: str) -> tuple[int, int]:
    """Every result object for ``DEST`` SENT and received; (undelivered, duplicate receptions)."""
    received = dest.receptions()
    rows = [(uid, state) for name, uid, state in node.outbox() if name == DEST]
    undelivered = [uid for uid, state in rows if state != "SENT" or received[uid] == 0]
    duplicates = sum(count - 1 for count in received.values() if count > 1)
    if undelivered:
        totals.fail(
            f"{where}: {len(undelivered)} of {len(rows)} result object(s) not delivered, e.g. {undelivered[:3]}"
        )
    totals.undelivered += len(undelivered)
    return len(undelivered), duplicates


def stop_and_check(node: Node, totals: Totals, where: str) -> float:
    """SIGTERM, then PRAGMA integrity_check on the ledger; the seconds the stop took."""
    seconds, rc = node.terminate(timeout=timeout_stop_sec() + 30)
    if rc != 0:
        totals.fail(f"{where}: SIGTERM: exit status {rc} after {seconds:.1f} s\n{node.log_tail(10)}")
    if (verdict := node.integrity()) != "ok":
        totals.fail(f"{where}: PRAGMA integrity_check: {verdict}")
    return seconds


def acked_digests(senders: list[Sender]) -> dict[str, str]:
    return {uid: inst.sha256 for s in senders for uid, inst in s.acked.items()}


def run_sender(port: int, studies: list[list[Instance]], name: str, timeout: float = 60) -> Sender:
    sender = Sender(name, port, studies, deadline=time.monotonic() + timeout)
    sender.run()
    return sender


# -- 1. kill -9 ------------------------------------------------------------------------------------
def kill_scenario(work: Path, template: list[Dataset], p: Params, seed: int, totals: Totals) -> None:
    """kill -9 at random points while 3 senders store and analyses and dispatches run."""
    print(f"[kill -9] {p.kills} kills, 3 senders × {p.studies_per_sender} studies", flush=True)
    rng = random.Random(seed)
    port, dport = free_port(), free_port()
    dest = Storescp(work, "SOAKPACS", dport)
    node = Node(work, node_settings(work / "state", port, {DEST: dport}))
    studies = [
        [
            write_study(template, work / "studies" / f"{k}-{i}", f"kill-{seed}-{k}-{i}")
            for i in range(p.studies_per_sender)
        ]
        for k in range(3)
    ]
    try:
        node.start()
        deadline = time.monotonic() + 300 + p.kills * 60 + p.studies_per_sender * (p.between_studies + 30)
        senders = [
            Sender(f"SENDER{k}", port, studies[k], deadline=deadline, between_studies=p.between_studies)
            for k in range(3)
        ]
        for s in senders:
            s.start()
        for k in range(p.kills):
            if k % 2 == 1:  # anywhere: receiving, completing, analysing
                time.sleep(rng.uniform(0.3, 3.0))
            else:  # right after the destination received an object: inside a dispatch
                seen, waited = dest.files(), time.monotonic()
                while dest.files() == seen and time.monotonic() - waited < 40:
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.05))
            node.kill9()
            totals.kills += 1
            at_death = node.job_states()
            if at_death.get("DISPATCHING", 0):
                totals.dispatch_kills += 1
            print(f"  kill {k + 1}: jobs at death {dict(at_death)}", flush=True)
            node.start()
        for s in senders:
            s.join(max(0.0, deadline - time.monotonic()))
            s.stop_event.set()
        unsent = sum(s.pending for s in senders)
        if unsent:
            totals.fail(f"kill -9: senders could not deliver {unsent} instance(s) before their deadline")
        acked = acked_digests(senders)
        totals.acknowledged += len(acked)
        check_finished(node, totals, "kill -9", p.quiet_timeout)
        totals.lost += check_acknowledged(node, acked, totals, "kill -9")
        _undelivered, dups = check_delivery(node, dest, totals, "kill -9")
        totals.duplicates += dups
        if dups > totals.dispatch_kills:
            totals.fail(
                f"kill -9: {dups} duplicate deliveries, more than the {totals.dispatch_kills} kills "
                "during dispatch (at most one object in flight per destination per kill)"
            )
        stop_and_check(node, totals, "kill -9")
    except NodeDied as exc:
        totals.node_alive = False
        totals.fail(f"kill -9: {exc}")
    finally:
        node.kill9()
        dest.stop()


# -- 2. full file systems --------------------------------------------------------------------------
def full_disk_scenario(work: Path, template: list[Dataset], p: Params, seed: int, totals: Totals) -> None:
    """Spool and ledger on a small tmpfs: fill it, expect 0xA700, free it, expect everything to finish."""
    mnt = work / "fs"
    mnt.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        why = (mounted.stderr or mounted.stdout).strip() or f"exit status {mounted.returncode}"
        totals.note(f"full-disk scenario SKIPPED: cannot mount a tmpfs ({why}); run as root to include it")
        return
    print("[full disk] spool and ledger on a 24 MiB tmpfs", flush=True)
    port, dport = free_port(), free_port()
    dest = Storescp(work, "SOAKPACS", dport)
    node = Node(
        work, node_settings(mnt, port, {DEST: dport}, storage={"min_free_mb": 1, "quarantine_max_mb": 1})
    )
    filler = mnt / "filler"
    try:
        node.start()
        first = run_sender(port, [write_study(template, work / "full-0", f"full-{seed}-0")], "FULL0")
        st = os.statvfs(mnt)
        room = 1024 * 1024 + 120 * 1024  # the 1 MiB watermark plus about a dozen small images
        with filler.open("wb") as f:
            f.write(bytes(max(0, st.f_bavail * st.f_frsize - room)))
        studies = [
            write_study(template, work / f"full-{i}", f"full-{seed}-{i}")
            for i in range(1, p.full_disk_studies + 1)
        ]
        sender = Sender("FULL1", port, studies, deadline=time.monotonic() + 180, pause=0.2)
        sender.start()
        waited = time.monotonic()
        while sender.statuses[0xA700] < 3 and sender.is_alive() and time.monotonic() - waited < 40:
            time.sleep(0.1)
        if sender.statuses[0xA700] < 3:
            totals.fail(f"full disk: no 0xA700 while the spool was full (statuses {dict(sender.statuses)})")
        if not (node.alive() and echo(port)):
            totals.node_alive = False
            totals.fail("full disk: the node did not answer C-ECHO with its spool full")
        totals.lost += check_acknowledged(
            node, acked_digests([first, sender]), totals, "full disk (while full)"
        )
        filler.unlink()
        sender.join(120)
        sender.stop_event.set()
        if sender.pending:
            totals.fail(f"full disk: {sender.pending} instance(s) still refused after space returned")
        totals.full_disk_refusals += sum(n for status, n in sender.statuses.items() if status != 0)
        others = {f"0x{s:04X}": n for s, n in sender.statuses.items() if s not in (0, 0xA700)}
        if others:
            totals.note(f"full disk: refusals other than 0xA700: {others}")
        acked = acked_digests([first, sender])
        totals.acknowledged += len(acked)
        check_finished(node, totals, "full disk", p.quiet_timeout)
        totals.lost += check_acknowledged(node, acked, totals, "full disk")
        totals.duplicates += check_delivery(node, dest, totals, "full disk")[1]
        stop_and_check(node, totals, "full disk")
    except NodeDied as exc:
        totals.node_alive = False
        totals.fail(f"full disk: {exc}")
    finally:
        node.kill9()
        dest.stop()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# -- 3. malformed inputs and connection attacks, 4. a hung destination -------------------------------
def attack_scenario(work: Path, template: list[Dataset], p: Params, seed: int, totals: Totals) -> None:
    """The corpus against one node whose results go to a healthy storescp and to a peer that never answers."""
    port, dport, hport = free_port(), free_port(), free_port()
    dest = Storescp(work, "SOAKPACS", dport)
    hung = HungPeer(hport)
    max_assoc = 8
    settings = node_settings(
        work / "state",
        port,
        {DEST: dport, "hung": hport},
        listener={
            "allowed_networks": ["127.0.0.1/32"],
            "max_associations": max_assoc,
            "max_dataset_mb": 8,
            "acse_timeout": 5,
            "dimse_timeout": 10,
            "network_timeout": 5,
        },
        dispatch={"timeout_seconds": 30},
    )
    node = Node(work, settings)
    try:
        node.start()
        base_rss = node.rss_mib()
        valid = run_sender(port, [write_study(template, work / "attack-0", f"attack-{seed}-0")], "VALID")
        acked = acked_digests([valid])
        cases = corpus.build(template[len(template) // 2], seed, p.mutations)
        print(f"[malformed] {len(cases)} inputs + connection attacks", flush=True)
        by_category: dict[str, list[corpus.Case]] = {}
        for case in cases:
            by_category.setdefault(case.category, []).append(case)
        for category, batch in by_category.items():
            counts = totals.outcomes.setdefault(category, Counter())
            for case in batch:
                outcome = case.send(port)
                counts[outcome] += 1
                totals.malformed += 1
                if outcome == "0x0000":
                    if case.must_refuse:
                        totals.fail(f"malformed: {category}: acknowledged with Success (SOP {case.sop_uid})")
                    elif case.sop_uid:
                        acked[case.sop_uid] = hashlib.sha256(case.body).hexdigest()
            _after_batch(node, port, acked, totals, category)
        _connection_attacks(node, port, max_assoc, acked, totals)
        totals.max_rss_mib = max(totals.max_rss_mib, node.rss_mib("VmHWM"))
        totals.rss_growth_mib = max(totals.rss_growth_mib, node.rss_mib("VmHWM") - base_rss)
        if totals.rss_growth_mib > 300:
            totals.fail(
                f"malformed: node RSS grew by {totals.rss_growth_mib:.0f} MiB under attack (bound 300)"
            )
        _hung_destination(node, port, dest, hung, work, template, seed, acked, totals)
        totals.acknowledged += len(acked)
        totals.stop_seconds = stop_and_check(node, totals, "hung destination")
        if totals.stop_seconds >= timeout_stop_sec():
            totals.fail(f"hung destination: SIGTERM took {totals.stop_seconds:.1f} s, beyond TimeoutStopSec")
        totals.lost += check_acknowledged(node, acked, totals, "malformed inputs (after stop)")
    except NodeDied as exc:
        totals.node_alive = False
        totals.fail(f"malformed: {exc}")
    finally:
        node.kill9()
        hung.stop()
        dest.stop()


def _after_batch(node: Node, port: int, acked: dict[str, str], totals: Totals, category: str) -> None:
    started = time.monotonic()
    while not (node.alive() and echo(port)):  # slots of attack connections may take a timeout to free
        if not node.alive() or time.monotonic() - started > 20:
            totals.node_alive = False
            raise NodeDied(f"no C-ECHO answer within 20 s after the {category!r} batch:\n{node.log_tail()}")
        time.sleep(0.5)
    if (waited := time.monotonic() - started) > 1:
        totals.note(
            f"after the {category!r} batch a real peer's C-ECHO was answered only after {waited:.0f} s"
        )
    totals.max_rss_mib = max(totals.max_rss_mib, node.rss_mib())
    totals.lost += check_acknowledged(node, acked, totals, f"malformed ({category})")


def _connection_attacks(node: Node, port: int, max_assoc: int, acked: dict[str, str], totals: Totals) -> None:
    """Silent and trickling peers, half-open floods from allowed and disallowed addresses."""
    counts = totals.outcomes.setdefault("connection attacks", Counter())
    limit = 5 + 5 + 5  # acse_timeout + network_timeout + slack
    silent = corpus.hold(port, 1)
    during = echo(port)
    closed = bool(silent) and corpus.closed_by_node(silent[0], limit)
    for s in silent:
        s.close()
    counts[f"silent peer {'closed' if closed else 'HELD'}"] += 1
    totals.malformed += 1
    if not closed or not during:
        totals.fail(
            f"silent connection: closed by the node within {limit} s: {closed}; C-ECHO meanwhile: {during}"
        )
    trickle = corpus.hold(port, 1, data=corpus.associate_rq()[:7])
    closed = False
    started = time.monotonic()
    while trickle and time.monotonic() - started < limit:
        try:
            trickle[0].sendall(b"\0")
        except OSError:
            closed = True
            break
        if corpus.closed_by_node(trickle[0], 0.5):
            closed = True
            break
    for s in trickle:
        s.close()
    counts[f"trickling peer {'closed' if closed else 'HELD'}"] += 1
    totals.malformed += 1
    if not closed:
        totals.fail(f"trickling connection (one byte every 0.5 s): still open after {limit} s")
    for source, label in (("127.0.0.2", "disallowed"), ("127.0.0.1", "allowed")):
        held = corpus.hold(port, 3 * max_assoc, source=source)
        time.sleep(0.3)
        during = echo(port, timeout=8)
        for s in held:
            s.close()
        counts[
            f"half-open flood ×{len(held)} from {label} address: C-ECHO {'answered' if during else 'LOCKED OUT'}"
        ] += 1
        totals.malformed += len(held)
        if not during:
            totals.fail(
                f"half-open flood of {len(held)} silent connections from {source}: a real peer's "
                "C-ECHO was locked out (issue 12 item 2)"
            )
    _after_batch(node, port, acked, totals, "connection attacks")


def _hung_destination(
    node: Node,
    port: int,
    dest: Storescp,
    hung: HungPeer,
    work: Path,
    template: list[Dataset],
    seed: int,
    acked: dict[str, str],
    totals: Totals,
) -> None:
    """A new study's results reach the healthy destination promptly while the other one hangs."""
    print("[hung destination]", flush=True)
    study = write_study(template, work / "hung-0", f"hung-{seed}-0")
    sender = run_sender(port, [study], "HUNGTEST")
    last_ack = time.monotonic()
    acked.update(acked_digests([sender]))
    uid = study[0].study_uid
    while time.monotonic() - last_ack < 90:
        rows = node.query(
            "SELECT o.sop_instance_uid, o.state FROM outbox o JOIN jobs j ON j.id = o.job_id "
            "JOIN studies s ON s.id = j.study_id WHERE s.study_instance_uid = ? AND o.destination = ?",
            uid,
            DEST,
        )
        received = dest.receptions()
        if rows and all(state == "SENT" and received[sop] for sop, state in rows):
            break
        time.sleep(0.1)
    totals.healthy_latency_s = time.monotonic() - last_ack
    if totals.healthy_latency_s > 20:
        totals.fail(
            f"hung destination: the healthy destination got the results after {totals.healthy_latency_s:.0f} s"
        )
    if not hung.accepted:
        totals.note("hung destination: the hung peer was never connected to")
