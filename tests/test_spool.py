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


def test_leftover_partial_writes_are_removed_at_start(tmp_path: Path) -> None:
    (tmp_path / "spool" / "tmp").mkdir(parents=True)
    (tmp_path / "spool" / "tmp" / "123.part").write_bytes(b"half")
    Spool(tmp_path / "spool")  # another process's spool: must not touch writes in flight
    assert [p.name for p in (tmp_path / "spool" / "tmp").iterdir()] == ["123.part"]
    Spool(tmp_path / "spool", clean_partial=True)
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []
