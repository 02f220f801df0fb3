"""The session recorder: asciicast v2 files, bounded buffers, failures that never reach the
session, and the ``audit`` config section."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from kuberun_trio.errors import ConfigError, ConfigErrors
from kuberun_trio.recording import Recorder, RecordingOptions, SessionRecording
from kuberun_trio.server.config import parse_server_config

FIELDS = {"connection_id": "c0ffee", "session_id": "c0ffee-1"}


def _open(recorder: Recorder, kind: Any = "shell", number: int = 1) -> SessionRecording:
    return recorder.open(connection_id="c0ffee", number=number, kind=kind, width=100,
                         height=30, env={"TERM": "xterm", "SHELL": "/bin/sh"},
                         title="alice: /bin/sh -l", fields=FIELDS)


def _read(path: str) -> tuple[dict[str, Any], list[list[Any]]]:
    lines = Path(path).read_text().splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


def _text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


async def test_a_shell_recording(tmp_path: Path) -> None:
    recorder = Recorder(RecordingOptions(str(tmp_path / "rec"), stdin=True))
    rec = _open(recorder)
    rec.stdout(b"hello ")
    rec.stdout("café".encode()[:4])  # "caf" + half of "é"
    rec.stdout("café".encode()[4:] + b"\r\n")
    rec.stdin(b"ls\r")
    rec.resize(120, 40)
    rec.stderr(b"oops\r\n")
    rec.close()
    await recorder.flush()
    day = Path(rec.path).parent.parent.name
    assert Path(rec.path) == tmp_path / "rec" / day / "c0ffee" / "1-shell.cast"
    assert stat.S_IMODE(os.stat(rec.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(Path(rec.path).parent).st_mode) == 0o700
    header, events = _read(rec.path)
    assert header["version"] == 2 and (header["width"], header["height"]) == (100, 30)
    assert header["env"] == {"TERM": "xterm", "SHELL": "/bin/sh"}
    assert header["title"] == "alice: /bin/sh -l" and isinstance(header["timestamp"], int)
    assert [(code, data) for _, code, data in events] == [
        ("o", "hello "), ("o", "caf"), ("o", "é\r\n"), ("i", "ls\r"), ("r", "120x40"),
        ("o", "oops\r\n")]
    times = [t for t, _, _ in events]
    assert times == sorted(times) and times[0] >= 0


async def test_input_is_not_recorded_by_default(tmp_path: Path) -> None:
    recorder = Recorder(RecordingOptions(str(tmp_path), stderr=False))
    rec = _open(recorder, "exec")
    rec.stdin(b"secret\n")
    rec.stderr(b"err\n")
    rec.stdout(b"out\n")
    rec.close()
    await recorder.flush()
    assert rec.path.endswith("/1-exec.cast")
    _, events = _read(rec.path)
    assert [(code, data) for _, code, data in events] == [("o", "out\n")]


async def test_a_subsystem_records_only_byte_counts(tmp_path: Path) -> None:
    recorder = Recorder(RecordingOptions(str(tmp_path), stdin=True))
    rec = _open(recorder, "subsystem", 2)
    rec.stdin(b"\x00\x00\x00\x05\x01abcd")
    rec.stdout(b"\x00" * 100)
    rec.close()
    await recorder.flush()
    assert rec.path.endswith("/2-subsystem.cast")
    _, events = _read(rec.path)
    assert [(code, data) for _, code, data in events] == [
        ("m", "subsystem: 9 bytes in, 100 bytes out (not recorded)")]


async def test_a_full_buffer_drops_and_marks_the_recording_incomplete(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder(RecordingOptions(str(tmp_path), buffer_bytes=1000))
    rec = _open(recorder)
    for _ in range(30):  # the writer is not running: as if the disk were stuck
        rec.stdout(b"x" * 100)
    assert rec.dropped == 2000
    with caplog.at_level(logging.INFO, "kuberun_trio.recording"):
        await recorder.flush()
        rec.stdout(b"after\n")
        rec.close()
        await recorder.flush()
    _, events = _read(rec.path)
    outputs = "".join(data for _, code, data in events if code == "o")
    assert outputs == "x" * 1000 + "after\n"
    assert [data for _, code, data in events if code == "m"] == [
        "recording incomplete: 2000 bytes not recorded (the recorder did not keep up)"]
    events_logged = [r.__dict__.get("event") for r in caplog.records]
    assert events_logged.count("recording-incomplete") == 1
    end = [r for r in caplog.records if r.__dict__.get("event") == "recording-end"]
    assert end[0].__dict__["bytes_not_recorded"] == 2000


async def test_the_writer_keeps_to_its_cpu_budget(tmp_path: Path) -> None:
    recorder = Recorder(RecordingOptions(str(tmp_path), cpu_share=0.0))
    rec = _open(recorder)
    rec.stdout(b"never written\n")
    rec.close()
    await recorder.flush()
    _, events = _read(rec.path)
    assert [(code, data) for _, code, data in events] == [
        ("m", "recording incomplete: 14 bytes not recorded (the recorder did not keep up)")]
    assert rec.skipped == 14


async def test_an_unwritable_directory_is_logged_and_the_session_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("not a directory")
    recorder = Recorder(RecordingOptions(str(tmp_path / "file")))
    rec = _open(recorder)
    rec.stdout(b"lost\n")
    with caplog.at_level(logging.INFO, "kuberun_trio.recording"):
        await recorder.flush()
    rec.stdout(b"more\n")  # no error on the data path
    rec.close()
    await recorder.flush()
    assert rec.failed
    assert [r.__dict__.get("event") for r in caplog.records].count("recording-failed") == 1


async def test_the_writer_flushes_while_the_session_runs(tmp_path: Path) -> None:
    recorder = Recorder(RecordingOptions(str(tmp_path), flush_interval=0.2))
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        rec = _open(recorder)
        rec.stdout(b"early\n")
        with trio.fail_after(5):
            while "early" not in _text(rec.path):
                await trio.sleep(0.05)
        rec.stdout(b"late\n")  # still open when the gateway stops: written on the way out
        nursery.cancel_scope.cancel()
    _, events = _read(rec.path)
    assert [data for _, _, data in events] == ["early\n", "late\n"]


def test_audit_config() -> None:
    config = parse_server_config({}, instance="t")
    assert config.audit.recording is None
    config = parse_server_config({"audit": {
        "enable": True, "format": "asciinema", "storage": "file",
        "file": {"directory": "/var/log/kuberun"},
        "intercept": {"stdin": True, "stderr": False}}}, instance="t")
    assert config.audit.recording == RecordingOptions(directory="/var/log/kuberun", stdin=True,
                                                      stdout=True, stderr=False)


def test_audit_config_errors_name_the_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigErrors) as caught:
        parse_server_config({"audit": {"enable": True, "format": "binary",
                                       "storage": "s3"}}, instance="t")
    text = str(caught.value)
    assert "audit.format: 'binary' is not supported (supported: asciinema)" in text, text
    assert "audit.storage: 's3' is not supported (supported: file)" in text, text
    assert "audit.file.directory: required when audit.enable is true" in text, text
    with pytest.raises(ConfigError, match=r"only audit\.storage: file is supported"):
        parse_server_config({"audit": {"s3": {}}}, instance="t")
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match=r"audit\.file\.directory: .* is not a directory"):
        parse_server_config({"audit": {"enable": True, "file": {
            "directory": str(tmp_path / "f" / "rec")}}}, instance="t", files=True)


def test_check_config_says_not_supported(tmp_path: Path) -> None:
    path = tmp_path / "audit.yaml"
    path.write_text("audit: {enable: true, format: binary, storage: s3, "
                    "file: {directory: /tmp}}\n")
    result = subprocess.run([sys.executable, "-m", "kuberun_trio", "check-config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "audit.format: 'binary' is not supported (supported: asciinema)" in result.stderr
    assert "audit.storage: 's3' is not supported (supported: file)" in result.stderr
