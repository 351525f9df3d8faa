"""No path leaves a datastore's root: real workspaces and files."""

from __future__ import annotations

from pathlib import Path

import pytest

from daskrun import ConfigError, Dataset, Datastore, Workspace
from daskrun.registry.workspace import OutputData

ESCAPES = ["../x", "../../x", "a/../../x", "/../x", "a/b/../../../x"]


@pytest.fixture
def store(tmp_path: Path) -> Datastore:
    return Workspace.create(tmp_path / "ws").get_default_datastore()


@pytest.mark.parametrize("path", ESCAPES)
def test_uploads_stay_inside_the_datastore(
    tmp_path: Path, store: Datastore, path: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_text("data")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ConfigError, match=f"{path!r} leaves datastore 'workspacest"):
        store.upload_files([src / "f.txt"], target_path=path)
    with pytest.raises(ConfigError, match=f"{path!r} leaves datastore"):
        store.upload(str(src), target_path=path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("path", ESCAPES)
def test_datastore_paths_stay_inside(store: Datastore, path: str) -> None:
    with pytest.raises(ConfigError, match=f"{path!r} leaves datastore"):
        store.path(path)
    with pytest.raises(ConfigError, match=f"{path!r} leaves datastore"):
        store.url(path)
    with pytest.raises(ConfigError, match=f"{path!r} leaves datastore"):
        Dataset.File.from_files((store, path))


def test_paths_inside_still_work(tmp_path: Path, store: Datastore) -> None:
    (tmp_path / "f.txt").write_text("data")
    store.upload_files([tmp_path / "f.txt"], target_path="a/../b/")
    assert (Path(store.root or "") / "b" / "f.txt").read_text() == "data"
    files = Dataset.File.from_files(store.path("b/")).files()
    assert [Path(f).name for f in files] == ["f.txt"]


def test_remote_datastore_paths_stay_inside(tmp_path: Path) -> None:
    ws = Workspace.create(tmp_path / "ws")
    blob = Datastore.register_azure_blob_container(
        ws,
        "blobstore",
        container_name="sampledata",
        account_name="devstoreaccount1",
        account_key="bm90LWEta2V5",
        endpoint="http://127.0.0.1:9/devstoreaccount1",
    )
    with pytest.raises(ConfigError, match="'../other/x' leaves datastore 'blobstore'"):
        blob.url("../other/x")
    assert blob.url("a/b") == "abfs://sampledata/a/b"


@pytest.mark.parametrize("path", ["../x", "a/../../x"])
def test_output_download_refuses_a_path_outside(
    tmp_path: Path, store: Datastore, path: str
) -> None:
    with pytest.raises(ConfigError, match=f"{path!r} leaves datastore"):
        OutputData("scores", store, path).download(tmp_path / "dl")
    assert not (tmp_path / "dl").exists()


def test_output_download_stays_under_the_local_path(
    tmp_path: Path, store: Datastore
) -> None:
    # an absolute path on the datastore lands under local_path, not at the
    # same absolute path on this machine
    elsewhere = tmp_path / "elsewhere"
    inside = Path(store.root or "") / str(elsewhere).lstrip("/")
    inside.mkdir(parents=True)
    (inside / "a.txt").write_text("scores")
    folder = OutputData("scores", store, str(elsewhere)).download(tmp_path / "dl")
    assert not elsewhere.exists()
    assert Path(folder).is_relative_to(tmp_path / "dl")
    assert (Path(folder) / "a.txt").read_text() == "scores"
