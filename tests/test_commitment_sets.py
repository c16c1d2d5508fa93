"""A repeated Transaction UID is the same transaction when it names the same *set* of
instances, in any order (#34, item 14); another set is still refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from dcmrecvd.store.commitment_store import CommitmentStore, Conflict, _ordered_digest

pytestmark = pytest.mark.inprocess

CT = "1.2.840.10008.5.1.4.1.1.2"
A, B, C = ((CT, f"1.2.3.{n}") for n in (1, 2, 3))


def test_the_same_instances_in_another_order_are_the_same_transaction(tmp_path: Path) -> None:
    store = CommitmentStore(tmp_path / "commitment.sqlite")
    tx, new = store.add("9.9", "MOD", "RCV", "h", [A, B, C], 1.0, 10)
    assert new
    assert store.add("9.9", "MOD", "RCV", "h", [C, B, A], 2.0, 10) == (tx, False)
    assert store.add("9.9", "MOD", "RCV", "h", [B, A, C, A], 3.0, 10) == (tx, False)
    with pytest.raises(Conflict):
        store.add("9.9", "MOD", "RCV", "h", [A, B], 4.0, 10)


def test_a_transaction_kept_by_an_older_version_still_matches_its_repeat(tmp_path: Path) -> None:
    store = CommitmentStore(tmp_path / "commitment.sqlite")
    tx, _ = store.add("8.8", "MOD", "RCV", "h", [C, A], 1.0, 10)
    store.db.execute("UPDATE transactions SET digest = ? WHERE id = ?", (_ordered_digest([C, A]), tx))
    assert store.add("8.8", "MOD", "RCV", "h", [C, A], 2.0, 10) == (tx, False)
