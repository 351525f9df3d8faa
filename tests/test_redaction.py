"""Credentials in errors raised on workers never reach logs, records or the
terminal."""

from __future__ import annotations

from pathlib import Path

import pytest

from daskrun import Dataset

from .helpers import make_files, run_step

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
    seen = {"terminal": terminal.out + terminal.err}
    for folder in (runs_dir, tmp_path / "out"):
        for path in folder.rglob("*"):  # runs.db and its WAL included
            if path.is_file():
                seen[str(path)] = path.read_bytes().decode("latin-1")
    assert any("runs.db" in name for name in seen)
    for secret in (SAS, KEY, "Q2xpZW50U2VjcmV0U2lnbmF0dXJl"):
        leaks = [name for name, text in seen.items() if secret in text]
        assert not leaks, (secret, leaks)
