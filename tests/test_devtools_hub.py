"""The local Hub server answers huggingface_hub's own calls as the real Hub does."""

from __future__ import annotations

from pathlib import Path

import pytest
from hf_fixtures import REPO_ID, Hub, hub_fixture  # noqa: F401 - the fixture
from huggingface_hub import HfApi, get_session, hf_hub_url, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from devtools.hub_server import TREE_PAGE_SIZE


def test_tree_listing_is_paged_and_complete(hub: Hub) -> None:
    hub.server.push(REPO_ID, {f"a/{index}.txt": b"x" for index in range(TREE_PAGE_SIZE + 10)})
    files = HfApi(endpoint=hub.relay.url).list_repo_files(REPO_ID)
    assert len(files) == TREE_PAGE_SIZE + 10
    pages = [path for _, path in hub.requests("GET") if "/tree/" in path]
    assert len(pages) == 2


def test_snapshot_download_gets_the_files_of_a_revision(hub: Hub, tmp_path: Path) -> None:
    first = hub.server.push(REPO_ID, {"sub/model.safetensors": b"v1" * 1000, "README.md": b"hi"})
    hub.server.push(REPO_ID, {"sub/model.safetensors": b"v2" * 1000})
    folder = snapshot_download(
        REPO_ID, revision=first, endpoint=hub.relay.url, cache_dir=tmp_path / "hf"
    )
    assert (Path(folder) / "sub" / "model.safetensors").read_bytes() == b"v1" * 1000
    info = HfApi(endpoint=hub.relay.url).model_info(REPO_ID, files_metadata=True)
    assert info.siblings is not None
    lfs = {s.rfilename: s.lfs for s in info.siblings}
    assert lfs["README.md"] is None and lfs["sub/model.safetensors"] is not None


def test_ranges_are_answered_with_206(hub: Hub) -> None:
    hub.server.push(REPO_ID, {"data.bin": bytes(range(256))})
    url = hf_hub_url(REPO_ID, "data.bin", endpoint=hub.relay.url)
    response = get_session().get(url, headers={"Range": "bytes=10-19"})
    assert response.status_code == 206
    assert response.content == bytes(range(10, 20))
    assert response.headers["Content-Range"] == "bytes 10-19/256"


def test_errors_map_to_huggingface_hub_error_types(hub: Hub) -> None:
    api = HfApi(endpoint=hub.relay.url)
    hub.server.push(REPO_ID, {"README.md": b"hi"})
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/absent")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO_ID, revision="absent")
    with pytest.raises(RemoteEntryNotFoundError):
        api.get_hf_file_metadata(url=hf_hub_url(REPO_ID, "absent", endpoint=hub.relay.url))
    hub.server.set_gated(REPO_ID, "hf_granted")
    url = hf_hub_url(REPO_ID, "README.md", endpoint=hub.relay.url)
    with pytest.raises(GatedRepoError):
        api.get_hf_file_metadata(url=url, token="hf_not_granted")
    assert api.get_hf_file_metadata(url=url, token="hf_granted").size == 2
