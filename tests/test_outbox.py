"""The event outbox, in-process: recording, completion, restart, recovery, hook values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dcmrecvd.events import body as events
from dcmrecvd.events.outbox import Outbox

pytestmark = pytest.mark.inprocess


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def stored(study: str, series: str, uid: str, calling: str = "CT1", called: str = "PACS") -> dict[str, Any]:
    return {
        "event": events.OBJECT_STORED,
        "called_aet": called,
        "calling_aet": calling,
        "study_uid": study,
        "series_uid": series,
        "sop_instance_uid": uid,
        "path": f"/out/CT.{uid}",
    }


def make(tmp_path: Path, clock: Clock, consumers: dict[str, frozenset[str]] | None = None) -> Outbox:
    box = Outbox(tmp_path / "events.sqlite", stable_seconds=60, max_seconds=600, clock=clock)
    box.consumers = consumers or {"all": frozenset(events_kinds())}
    return box


def events_kinds() -> tuple[str, ...]:
    from dcmrecvd.conf.config import EVENT_KINDS

    return EVENT_KINDS


def kinds(box: Outbox) -> list[str]:
    return [b["event"] for b in box.all_events()]


def test_an_object_becomes_an_event_with_a_delivery_per_consumer(tmp_path: Path) -> None:
    clock = Clock()
    box = make(tmp_path, clock, {"h1": frozenset({"object.stored"}), "h2": frozenset({"study.complete"})})
    box.record(stored("1.2", "1.2.1", "1.2.1.1"))
    assert box.drain() == 1
    assert kinds(box) == ["object.stored"]
    assert [d.body["sop_instance_uid"] for d in box.due("h1", set(), 10)[0]] == ["1.2.1.1"]
    assert box.due("h2", set(), 10) == ([], None)
    assert box.counts() == {"pending": 1, "dead": 0, "queued": 0}


def test_series_then_study_complete_after_the_stable_time_and_late_objects_update(tmp_path: Path) -> None:
    clock = Clock()
    box = make(tmp_path, clock)
    for uid, series in (("1", "1.2.1"), ("2", "1.2.2"), ("3", "1.2.1")):
        box.record(stored("1.2", series, uid))
        box.drain()
        clock.now += 10
    assert box.complete_due() == 0  # 10 s since the last object
    clock.now += 50
    assert box.complete_due() == 3
    done = [b for b in box.all_events() if b["event"] != "object.stored"]
    assert [b["event"] for b in done] == ["series.complete", "series.complete", "study.complete"]
    assert {b["series_uid"]: b["objects"] for b in done[:2]} == {"1.2.1": 2, "1.2.2": 1}
    assert done[2]["objects"] == 3 and done[2]["study_uid"] == "1.2" and "series_uid" not in done[2]
    clock.now += 3600
    box.record(stored("1.2", "1.2.1", "4"))  # a late arrival
    box.drain()
    clock.now += 61
    box.complete_due()
    late = kinds(box)[-2:]
    assert late == ["series.updated", "study.updated"]
    assert kinds(box).count("study.complete") == 1


def test_the_hard_cap_completes_a_study_that_never_goes_quiet(tmp_path: Path) -> None:
    clock = Clock()
    box = make(tmp_path, clock)
    for i in range(70):  # one object every 10 s for 700 s; stable is 60, the cap 600
        box.record(stored("1.9", "1.9.1", str(i)))
        box.drain()
        box.complete_due()
        clock.now += 10
    assert kinds(box).count("study.complete") == 1
    assert kinds(box).count("study.updated") == 0  # the rest is still open, not yet quiet


def test_interleaved_studies_and_one_study_over_several_associations(tmp_path: Path) -> None:
    clock = Clock()
    box = make(tmp_path, clock)
    for uid, study in (("1", "A"), ("2", "B"), ("3", "A"), ("4", "B")):  # one association, interleaved
        box.record(stored(study, study + ".1", uid))
    box.record(stored("A", "A.1", "5"))  # the same study again, from another association
    box.drain()
    clock.now += 61
    box.complete_due()
    complete = [b for b in box.all_events() if b["event"] == "study.complete"]
    assert sorted((b["study_uid"], b["objects"]) for b in complete) == [("A", 3), ("B", 2)]


def test_a_study_sent_by_two_calling_aes_is_two_completions(tmp_path: Path) -> None:
    clock = Clock()
    box = make(tmp_path, clock)
    box.record(stored("A", "A.1", "1", calling="CT1"))
    box.record(stored("A", "A.1", "2", calling="CT2"))
    box.drain()
    clock.now += 61
    box.complete_due()
    assert kinds(box).count("study.complete") == 2


def test_pending_completions_survive_a_restart_and_fire_once(tmp_path: Path) -> None:
    clock = Clock()
    box = make(tmp_path, clock)
    box.record(stored("A", "A.1", "1"))
    box.drain()
    box.stop()  # not completed on stop
    box.close()
    again = make(tmp_path, clock)
    assert again.meta("clean") == "0"  # running again; stop() said "1"
    clock.now += 61
    assert again.complete_due() == 2
    assert again.complete_due() == 0
    assert kinds(again).count("study.complete") == 1


def test_complete_on_stop(tmp_path: Path) -> None:
    clock = Clock()
    box = make(tmp_path, clock)
    box.record(stored("A", "A.1", "1"))
    box.stop(complete=True)
    assert kinds(box).count("study.complete") == 1


def test_a_failed_run_is_retried_then_dead_lettered(tmp_path: Path) -> None:
    clock = Clock()
    box = make(tmp_path, clock, {"h": frozenset({"object.stored"})})
    box.record(stored("A", "A.1", "1"))
    box.record(stored("A", "A.1", "2"))
    box.drain()
    first, _ = box.due("h", set(), 10)
    assert [d.body["sop_instance_uid"] for d in first] == ["1"]  # in order per study: one at a time
    box.failed(first[0].event_id, "h", "exit status 1", clock.now + 10)
    assert box.due("h", set(), 10) == ([], clock.now + 10)  # the study waits for its retry
    clock.now += 10
    again, _ = box.due("h", set(), 10)
    assert [d.event_id for d in again] == [first[0].event_id]
    assert box.attempts(first[0].event_id, "h") == 1
    box.failed(first[0].event_id, "h", "exit status 1", None)
    assert box.counts()["dead"] == 1
    assert [d.body["sop_instance_uid"] for d in box.due("h", set(), 10)[0]] == ["2"]  # no longer blocked


def test_hostile_values_stay_single_argv_items() -> None:
    """AE titles and patient IDs come from the wire: never split, never a shell."""
    body = {
        "event": "object.stored",
        "patient_id": "$(touch /tmp/x); `id` 'a b' \"c\" {path}",
        "calling_aet": "A B;rm -rf",
        "path": "/out/CT.1.2",
    }
    argv = events.argv(
        ["/bin/prog", "--patient={patient_id}", "{calling_aet}", "{path}", "{series_uid}"], body
    )
    assert argv == ["/bin/prog", "--patient=" + body["patient_id"], "A B;rm -rf", "/out/CT.1.2", ""]
    env = events.environment(body)
    assert env["DCMRECVD_PATIENT_ID"] == body["patient_id"] and env["DCMRECVD_EVENT"] == "object.stored"


def test_hooks_in_the_config_are_checked_and_printed_back() -> None:
    from dcmrecvd.conf import config
    from dcmrecvd.errors import ConfigError

    layer = {"hooks": [{"on": ["study.complete"], "exec": ["/usr/bin/prog", "{study_uid}"], "retries": 2}]}
    loaded = config.build([config.Layer("a.toml", layer)])
    assert loaded.hooks[0].name == "hook1" and loaded.hooks[0].retries == 2
    import tomllib

    again = config.build([config.Layer("printed", tomllib.loads(config.to_toml(loaded)))])
    assert again.hooks == loaded.hooks
    later = config.build([config.Layer("a.toml", layer), config.Layer("b.toml", {"hooks": []})])
    assert later.hooks == ()  # an array: the later file's list replaces the earlier one
    for bad, message in (
        ({"exec": ["/bin/x", "{study}"]}, "unknown placeholder"),
        ({"exec": ["/bin/x"], "on": ["study.done"]}, "not an event kind"),
        ({"exec": []}, "names no program"),
        ({"exec": ["/bin/x"], "shell": True}, "unknown key"),
    ):
        with pytest.raises(ConfigError, match=message):
            config.build([config.Layer("c.toml", {"hooks": [bad]})])


def test_on_may_name_one_kind_as_a_string_and_a_string_array_says_what_to_write() -> None:
    from dcmrecvd.conf import config
    from dcmrecvd.errors import ConfigError

    one = config.build([config.Layer("a.toml", {"hooks": [{"on": "study.complete", "exec": ["/bin/true"]}]})])
    assert one.hooks[0].on == ["study.complete"]
    with pytest.raises(ConfigError, match=r'write exec = \["/usr/bin/dcmsend", "pacs", "104"\]'):
        config.build([config.Layer("a.toml", {"hooks": [{"exec": "/usr/bin/dcmsend pacs 104"}]})])
    with pytest.raises(ConfigError, match="is not an event kind"):
        config.build([config.Layer("a.toml", {"hooks": [{"on": "study.done", "exec": ["/bin/true"]}]})])


@pytest.mark.parametrize(
    ("raw", "charset", "text"),
    [
        ("Jürgen-Ω".encode(), b"ISO_IR 192", "Jürgen-Ω"),
        ("Jürgen ".encode("latin-1"), b"ISO_IR 100", "Jürgen"),
        ("Иванов".encode("iso8859_5"), b"ISO_IR 144", "Иванов"),
        (b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B", b"\\ISO 2022 IR 87", "Yamada^Tarou=山田^太郎"),
        (b"PLAIN\x00", None, "PLAIN"),
        (b"ABC", b"NO SUCH SET", "ABC"),
        (b"\xff\xfe", b"ISO_IR 192", "\ufffd\ufffd"),
    ],
)
def test_captured_text_is_decoded_by_specific_character_set(
    raw: bytes, charset: bytes | None, text: str
) -> None:
    from dcmrecvd.wire.dataset_walk import decoded_text

    assert decoded_text(raw, charset) == text
