"""A short run of the association fuzzer (`make fuzz` runs 10,000 cases)."""

from __future__ import annotations

from pathlib import Path

from fuzz import fuzz


def test_three_hundred_mutated_conversations_break_no_oracle(tmp_path: Path) -> None:
    outcome = fuzz(300, seed=2, check_every=100, work=tmp_path)
    assert outcome.acknowledged > 0, "no mutation left a C-STORE intact: the fuzzer tests nothing"
