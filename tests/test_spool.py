from __future__ import annotations

from pathlib import Path

import pytest

from triaged.errors import InvalidDatasetError, StorageError
from triaged.spool import Spool, validate_uid


@pytest.mark.parametrize(
    "value",
    ["../../etc/passwd", "1.2.3/../../x", "1.2.a", "", None, "1." + "2" * 70, "1..2", ".1.2"],
)
def test_hostile_or_malformed_uids_are_refused(value: object) -> None:
    with pytest.raises(InvalidDatasetError):
        validate_uid(value, "SOPInstanceUID")


def test_a_uid_padded_with_a_null_byte_is_accepted_without_it() -> None:
    assert validate_uid("1.2.840.10008\x00", "StudyInstanceUID") == "1.2.840.10008"


def test_an_instance_is_written_atomically_under_its_uids(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    rel = spool.instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    stored = spool.store_instance(rel, b"DICM" * 100)
    assert rel == "studies/1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    assert (tmp_path / "spool" / rel).read_bytes() == b"DICM" * 100
    assert stored.size == 400 and not stored.already_present
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []
    again = spool.store_instance(rel, b"DICM" * 100)
    assert again.already_present and again.sha256 == stored.sha256


def test_paths_outside_the_spool_are_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    with pytest.raises(InvalidDatasetError):
        spool.instance_path("1.2", "../..", "3")
    with pytest.raises(StorageError):
        spool.absolute("../outside.dcm")


def test_an_unwritable_spool_raises_a_retryable_storage_error(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    # A file where the study folder should be: mkdir fails even for root, like a read-only mount.
    (tmp_path / "spool" / "studies" / "1").write_bytes(b"not a folder")
    with pytest.raises(StorageError) as info:
        spool.store_instance("studies/1/2/3.dcm", b"x")
    assert info.value.retryable
    assert "cannot write studies/1/2/3.dcm" in str(info.value)


def test_a_nearly_full_disk_refuses_before_writing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_mb=10**9)  # more than any disk has
    with pytest.raises(StorageError, match="MiB free"):
        spool.store_instance("studies/1/2/3.dcm", b"x")
    assert not (tmp_path / "spool" / "studies" / "1").exists()


def test_quarantine_keeps_the_bytes_and_the_reason(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    path = spool.quarantine(b"garbage", "0xC211 cannot decode", "from X@1.2.3.4")
    assert path is not None and path.read_bytes() == b"garbage"
    [(qpath, reason)] = spool.quarantined()
    assert qpath == path and "0xC211 cannot decode" in reason and "X@1.2.3.4" in reason


def test_below_the_free_space_watermark_quarantine_keeps_only_the_reason(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_mb=10**9)  # more than any disk has: always "below"
    path = spool.quarantine(b"x" * 2**20, "0xC211 cannot decode", "from X@1.2.3.4")
    assert path is not None and path.name.endswith(".reason.txt")
    assert not list((tmp_path / "spool" / "quarantine").glob("*.dcm"))
    [(qpath, reason)] = spool.quarantined()
    assert not qpath.exists()
    assert "0xC211 cannot decode" in reason and "bytes not kept" in reason and "MiB free" in reason


def _quarantine_bytes(spool: Spool) -> int:
    return sum(p.stat().st_size for p in (spool.root / "quarantine").iterdir())


def test_quarantine_is_capped_and_the_oldest_go_first(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", quarantine_max_mb=1)
    # The flood from issue 12: refused 2 MiB stores (larger than the cap: reasons only), then 300 KiB ones.
    for i in range(30):
        spool.quarantine(b"x" * 2 * 2**20, f"big {i}", "from X@1.2.3.4")
    assert not list((spool.root / "quarantine").glob("*.dcm"))
    assert _quarantine_bytes(spool) <= 2**20
    kept = [spool.quarantine(bytes([i]) * 300 * 1024, f"small {i}", "from X@1.2.3.4") for i in range(8)]
    assert _quarantine_bytes(spool) <= 2**20
    entries = spool.quarantined()
    # Only the newest datasets fit (three of 300 KiB plus reasons); the oldest were deleted first.
    assert [r.splitlines()[-1] for p, r in entries if p.exists()] == ["small 5", "small 6", "small 7"]
    assert all(p is not None and p.exists() for p in kept[-3:])
    assert not any(p is not None and p.exists() for p in kept[:5])
    assert kept[-1] is not None and kept[-1].read_bytes() == bytes([7]) * 300 * 1024


def test_an_uncapped_quarantine_keeps_everything(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", quarantine_max_mb=0)
    for i in range(5):
        spool.quarantine(b"x" * 2**20, f"r{i}", "o")
    assert len([p for p, _ in spool.quarantined() if p.exists()]) == 5


def test_leftover_partial_writes_are_removed_at_start(tmp_path: Path) -> None:
    (tmp_path / "spool" / "tmp").mkdir(parents=True)
    (tmp_path / "spool" / "tmp" / "123.part").write_bytes(b"half")
    Spool(tmp_path / "spool")  # another process's spool: must not touch writes in flight
    assert [p.name for p in (tmp_path / "spool" / "tmp").iterdir()] == ["123.part"]
    Spool(tmp_path / "spool", clean_partial=True)
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []


def test_a_study_being_deleted_is_refused_by_every_process_storing_into_the_spool(tmp_path: Path) -> None:
    """Receiver processes have a Spool of their own: retention's mark must reach them (a file, not a set)."""
    node = Spool(tmp_path / "spool", clean_partial=True)
    receiver = Spool(tmp_path / "spool")  # what a receiver process opens on the same folder
    rel = receiver.instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    with node.purging("1.2.3"):
        with pytest.raises(StorageError, match="being deleted by retention"):
            receiver.store_instance(rel, b"DICM")
    assert receiver.store_instance(rel, b"DICM").already_present is False  # the mark is gone afterwards


def test_a_deletion_mark_left_by_a_kill_is_removed_when_the_node_starts(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    Spool(root)
    (root / "purging" / "1.2.3").touch()  # the node was killed inside Spool.purging
    spool = Spool(root, clean_partial=True)
    spool.store_instance(spool.instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5"), b"DICM")
