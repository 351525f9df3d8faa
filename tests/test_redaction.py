"""Credentials in errors raised on workers, and in what user code prints and
logs, never reach logs, records or the terminal, in any URL encoding."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pytest

from daskrun import Dataset
from daskrun.registry.records import RunRecord

from .helpers import daskrun, make_files, run_step, write_script

# fake credentials, as a SAS token and an account key would look
SAS = "sv=2024-05-04&ss=b&sig=Q2xpZW50U2VjcmV0U2lnbmF0dXJlMTIzNA%3D%3D"
KEY = "c2VjcmV0LWFjY291bnQta2V5LWZvci10ZXN0cy1vbmx5LTEyMzQ1Ng=="

# a storage call that fails and echoes the credentials it was given; they
# come from a file, so the script and its arguments hold none
SCRIPT = """
import argparse, os

def init():
    global sas, key
    p = argparse.ArgumentParser()
    p.add_argument("--secrets")
    sas, key = open(p.parse_known_args()[0].secrets).read().split()

def run(mini_batch):
    if any(os.path.basename(p).startswith("bad") for p in mini_batch):
        raise PermissionError(
            f"AuthenticationFailed: request https://acct.blob/c/x?{sas} "
            f"signed with AccountKey={key} was refused"
        )
    return [os.path.basename(p) for p in mini_batch]
"""


def assert_no_leaks(terminal: str, folders: list[Path], secrets: list[str]) -> None:
    """None of ``secrets`` is in ``terminal`` or any file below ``folders``
    (a run folder's ``runs.db`` and its WAL included)."""
    seen = {"terminal": terminal}
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                seen[str(path)] = path.read_bytes().decode("latin-1")
    assert any("runs.db" in name for name in seen)
    for secret in secrets:
        leaks = [name for name, text in seen.items() if secret in text]
        assert not leaks, (secret, leaks)


def test_worker_errors_are_redacted_everywhere(
    tmp_path: Path, runs_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_files(tmp_path / "in", 2, prefix="bad")
    make_files(tmp_path / "in", 4, prefix="ok")
    secrets = tmp_path / "secrets.txt"
    secrets.write_text(f"{SAS} {KEY}")
    run = run_step(
        tmp_path,
        SCRIPT,
        Dataset.File.from_files(
            str(tmp_path / "in"), storage_options={"sas_token": SAS}
        ),
        step_options={
            "output_storage_options": {"account_key": KEY},
            "arguments": ["--secrets", str(secrets)],
        },
        mini_batch_size=1,
        run_max_try=1,
        error_threshold=0,
        process_count_per_node=2,
        show_output=True,
    )
    assert run.status == "Failed"
    assert run.error is not None and "AuthenticationFailed" in run.error
    assert "sig=***" not in run.error  # the whole token goes, not a piece
    assert "?*** signed with AccountKey=***" in run.error
    logs = Path(run.logs_dir)
    for name in (
        "job_error.txt",
        "job_result.txt",
        "job_progress_overview.txt",
        "sys/job_report/failed_items.csv",
        "sys/job_report/processed_mini-batches.csv",
    ):
        assert "AccountKey=***" in (logs / name).read_text(), name
    terminal = capsys.readouterr()
    assert_no_leaks(
        terminal.out + terminal.err,
        [runs_dir, tmp_path / "out"],
        [SAS, KEY, "Q2xpZW50U2VjcmV0U2lnbmF0dXJl"],
    )


# a SAS token whose expiry (se=) is URL-encoded, as the portal gives it
SIGNATURE = "U2VydmVyRWNob2VkU2lnbmF0dXJlNTY3OA%3D%3D"
ENCODED_SAS = f"sv=2024-05-04&se=2030-01-01T00%3A00%3A00Z&sr=c&sig={SIGNATURE}"

# a server that echoes the request URL as the Azure SDK re-encodes it: the
# colons of se= decoded, the signature kept escaped (colons.txt), or all of
# it escaped (escaped.txt); and a signature not the datastore's, in full
ECHO_SCRIPT = """
import argparse, os, urllib.parse

def init():
    global sas
    p = argparse.ArgumentParser()
    p.add_argument("--secrets")
    sas = open(p.parse_known_args()[0].secrets).read().strip()

def run(mini_batch):
    if os.path.basename(mini_batch[0]) == "colons.txt":
        echoed = sas.replace("%3A", ":")
    else:
        echoed = urllib.parse.quote(urllib.parse.unquote(sas), safe="")
    raise PermissionError(
        f"AuthenticationFailed: GET https://acct.blob/c/x?{echoed} "
        "(the account's own: sig=T3RoZXJTaWduYXR1cmU%3D)"
    )
"""


def test_secrets_echoed_in_another_encoding_are_redacted(
    tmp_path: Path, runs_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "in").mkdir()
    for name in ("colons.txt", "escaped.txt"):
        (tmp_path / "in" / name).write_text("data")
    secrets = tmp_path / "secrets.txt"
    secrets.write_text(ENCODED_SAS)
    run = run_step(
        tmp_path,
        ECHO_SCRIPT,
        Dataset.File.from_files(
            str(tmp_path / "in"), storage_options={"sas_token": ENCODED_SAS}
        ),
        step_options={"arguments": ["--secrets", str(secrets)]},
        mini_batch_size=1,
        run_max_try=1,
        error_threshold=-1,
        process_count_per_node=1,
        show_output=True,
    )
    logs = Path(run.logs_dir)
    assert (
        "GET https://acct.blob/c/x?*** (the account's own: sig=***)"
        in (logs / "job_error.txt").read_text()
    )
    for name in ("failed_items.csv", "processed_mini-batches.csv"):
        text = (logs / "sys" / "job_report" / name).read_text()
        assert text.count("x?*** (the account's own: sig=***)") == 2, name
    terminal = capsys.readouterr()
    assert "AuthenticationFailed" in terminal.err
    assert_no_leaks(
        terminal.out + terminal.err,
        [runs_dir, tmp_path / "out"],
        ["U2VydmVyRWNob2Vk", "T3RoZXJTaWduYXR1cmU"],
    )


# user code that prints and logs the datastore's key, in init() and run(),
# through every channel an entry script has
LOGGING_SCRIPT = """
import argparse, logging, os, sys
from daskrun import EntryScript, Run

def init():
    global key
    p = argparse.ArgumentParser()
    p.add_argument("--secrets")
    key = open(p.parse_known_args()[0].secrets).read().strip()
    print("init sees", key)
    EntryScript().logger.warning("init key=%s", key)

def run(mini_batch):
    run = Run.get_context()
    run.log("key", key)
    run.log_row("table", key=key, url="https://acct.blob/c?sig=" + key)
    run.log_list("keys", [key, "plain"])
    run.tag("credential", key)
    print("run sees", key)
    EntryScript().logger.warning("run key=%s", key)
    # what goes to the worker's stderr, and from there to the terminal
    print("stderr sees", key[:10], end="", file=sys.stderr)
    print(key[10:], file=sys.stderr)
    logging.getLogger("user.module").warning("logging sees %s", key)
    return [os.path.basename(p) for p in mini_batch]
"""


def test_what_user_code_logs_is_redacted(
    tmp_path: Path, runs_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    make_files(tmp_path / "in", 2)
    secrets = tmp_path / "secrets.txt"
    secrets.write_text(KEY)
    run = run_step(
        tmp_path,
        LOGGING_SCRIPT,
        Dataset.File.from_files(str(tmp_path / "in")),
        step_options={
            "output_storage_options": {"account_key": KEY},
            "arguments": ["--secrets", str(secrets)],
        },
        mini_batch_size=1,
        process_count_per_node=1,
        show_output=True,
    )
    assert run.status == "Completed", run.error
    metrics = run.get_metrics()
    assert metrics["key"] == ["***", "***"]
    assert metrics["table"]["url"] == ["https://acct.blob/c?sig=***"] * 2
    assert metrics["keys"] == ["***", "plain"]
    assert run.get_tags()["credential"] == "***"
    user = Path(run.logs_dir, "user")
    stdout = "".join(p.read_text() for p in user.glob("stdout/*.txt"))
    assert "init sees ***" in stdout and "run sees ***" in stdout
    logged = "".join(p.read_text() for p in user.glob("entry_script_log/*.txt"))
    assert "init key=***" in logged and "run key=***" in logged
    terminal = capfd.readouterr()  # the workers' stderr too
    assert "stderr sees ***" in terminal.err and "logging sees ***" in terminal.err
    assert_no_leaks(
        terminal.out + terminal.err,
        [runs_dir, tmp_path / "out"],
        [KEY, KEY[:20]],
    )


class _Files(http.server.SimpleHTTPRequestHandler):
    """Files of the current test's folder behind URLs that carry a SAS
    token, as a blob store's signed URLs do (the query is not checked)."""

    def translate_path(self, path: str) -> str:
        return super().translate_path(path.split("?", 1)[0])

    def log_message(self, *args: object) -> None:
        pass


def test_signed_input_urls_are_never_recorded(tmp_path: Path, runs_dir: Path) -> None:
    """An input URL's SAS signature stays out of every log, report and run
    record, also when a mini-batch over it fails; a resume asks for the URL
    again in one line, and with it completes the run."""
    served = tmp_path / "served"
    served.mkdir()
    (served / "a.txt").write_text("a\n")
    handler = functools.partial(_Files, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    signature = "U2lnbmVkVXJsU2lnbmF0dXJl%2Bz%3D"
    url = (
        f"http://127.0.0.1:{server.server_port}/a.txt"
        f"?sv=2024-05-04&se=2030-01-01T00%3A00Z&sp=r&sig={signature}"
    )
    (tmp_path / "broken").touch()
    write_script(
        tmp_path,
        "import os\ndef init(): pass\n"
        "def run(mb):\n"
        "    if os.path.exists('broken'):\n"
        "        raise RuntimeError(f'cannot score {mb}')\n"
        "    return ['scored' for _ in mb]\n",
    )
    secrets = [signature, "U2lnbmVkVXJsU2lnbmF0dXJl"]
    try:
        first = daskrun(
            "run", "score.py", "--input", url, "--output", "out",
            "--max-tries", "1", "--error-threshold", "0", "--processes", "1",
            cwd=tmp_path, runs=runs_dir,
        )  # fmt: skip
        assert first.returncode == 1, first.stderr
        terminal = first.stdout + first.stderr
        assert "cannot score" in terminal
        assert_no_leaks(terminal, [runs_dir, tmp_path / "out"], secrets)
        (record,) = RunRecord.find(runs_dir)
        asked = daskrun("resume", record.run_id, cwd=tmp_path, runs=runs_dir)
        assert asked.returncode == 2, asked.stderr
        (line,) = asked.stderr.splitlines()
        assert "SAS signature" in line and "--input URL" in line, line
        (tmp_path / "broken").unlink()
        again = daskrun(
            "resume", record.run_id, "--retry-failed", "--input", url,
            cwd=tmp_path, runs=runs_dir,
        )  # fmt: skip
    finally:
        server.shutdown()
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "out" / "parallel_run_step.txt").read_text() == "scored\n"
    assert_no_leaks(again.stdout + again.stderr, [runs_dir], secrets)
