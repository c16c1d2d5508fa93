"""Log formats and levels: JSON lines, DCMTK logger configs (-lc), quiet mode."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import DaemonFactory, dcmrecvd, need, run, wait_for
from datasets import make_dataset, write
from peers import send_file


def test_json_lines(daemons: DaemonFactory, tmp_path: Path) -> None:
    d = daemons.start("--log-format", "json")
    path = write(make_dataset(rows=8, columns=8), tmp_path / "a.dcm")
    assert send_file(d.port, path, calling="JSONTEST") == 0
    wait_for(lambda: "store.completed" in d.log())
    events = [json.loads(line) for line in d.log().splitlines() if line.startswith("{")]
    store = next(e for e in events if e["event"] == "store.completed")
    assert store["calling_aet"] == "JSONTEST"
    assert store["status"] == "0x0000"
    assert store["level"] == "info"
    assert "timestamp" in store


def test_quiet_and_default_levels(daemons: DaemonFactory, tmp_path: Path) -> None:
    path = write(make_dataset(rows=8, columns=8), tmp_path / "a.dcm")
    quiet = daemons.start("-q", verbose=False)
    assert send_file(quiet.port, path) == 0
    assert run([need("echoscu"), "-aec", "X", "127.0.0.1", str(quiet.port)]).returncode == 0
    quiet.stop()
    assert quiet.log().strip() == ""
    default = daemons.start(verbose=False)
    assert send_file(default.port, path) == 0
    assert send_file(default.port, path) == 0  # the same instance again: a warning
    wait_for(lambda: "store.replaced" in default.log())
    assert "store.completed" not in default.log()  # info is not shown by default


def test_dcmtk_logger_config_with_a_file(daemons: DaemonFactory, tmp_path: Path) -> None:
    logfile = tmp_path / "dcmrecvd.log"
    cfg = tmp_path / "logger.cfg"
    cfg.write_text(
        "# DCMTK logger configuration\n"
        "log4cplus.rootLogger = DEBUG, file\n"
        "log4cplus.appender.file = log4cplus::FileAppender\n"
        f"log4cplus.appender.file.File = {logfile}\n"
    )
    d = daemons.start("-lc", str(cfg), verbose=False)
    path = write(make_dataset(rows=8, columns=8), tmp_path / "a.dcm")
    assert send_file(d.port, path) == 0
    wait_for(lambda: logfile.exists() and "store.completed" in logfile.read_text())


def test_dcmtk_logger_config_with_unsupported_parts(tmp_path: Path, config_dir: Path) -> None:
    cfg = tmp_path / "logger.cfg"
    cfg.write_text("log4cplus.rootLogger = INFO, sys\nlog4cplus.appender.sys = log4cplus::SysLogAppender\n")
    result = dcmrecvd("--check-config", "-lc", str(cfg), "-od", str(tmp_path), "104", config_dir=config_dir)
    assert result.returncode == 1
    assert "SysLogAppender is not supported" in result.stderr
