from __future__ import annotations

import json
import os

import pytest

from tgi_backend.weights.hub import HubSettings, ModelNotFoundError, resolve_model_path

MAIN = "a" * 40
BRANCH = "b" * 40


def write_snapshot(cache: str, repo: str, commit: str, files: dict[str, str]) -> str:
    """Lays files out as huggingface_hub's cache does: models--org--name/snapshots/<commit>/..."""
    snapshot = os.path.join(cache, "models--" + repo.replace("/", "--"), "snapshots", commit)
    os.makedirs(snapshot, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(snapshot, name), "w", encoding="utf-8") as f:
            f.write(text)
    return snapshot


def write_ref(cache: str, repo: str, ref: str, commit: str) -> None:
    refs = os.path.join(cache, "models--" + repo.replace("/", "--"), "refs")
    os.makedirs(refs, exist_ok=True)
    with open(os.path.join(refs, ref), "w", encoding="utf-8") as f:
        f.write(commit)


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch) -> str:
    """A fake HF cache with org/tiny at main (commit a...) and branch "dev" (commit b...); offline."""
    cache = str(tmp_path / "hub")
    write_snapshot(cache, "org/tiny", MAIN, {"config.json": json.dumps({"rev": "main"})})
    write_snapshot(cache, "org/tiny", BRANCH, {"config.json": json.dumps({"rev": "dev"})})
    write_ref(cache, "org/tiny", "main", MAIN)
    write_ref(cache, "org/tiny", "dev", BRANCH)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.delenv("HF_HOME", raising=False)
    return cache


def read_rev(folder: str) -> str:
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        return json.load(f)["rev"]


def test_local_folder_is_returned_as_is(tmp_path) -> None:
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path(str(tmp_path), revision="ignored") == str(tmp_path)


def test_missing_local_path_names_the_folder(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match="does-not-exist"):
        resolve_model_path(str(tmp_path / "does-not-exist"))


def test_cached_model_resolves_by_default_branch(offline_cache) -> None:
    folder = resolve_model_path("org/tiny")
    assert read_rev(folder) == "main"
    assert folder.startswith(offline_cache)


def test_cached_model_resolves_by_branch_name_and_commit(offline_cache) -> None:
    assert read_rev(resolve_model_path("org/tiny", revision="dev")) == "dev"
    assert read_rev(resolve_model_path("org/tiny", revision=BRANCH)) == "dev"
    assert read_rev(resolve_model_path("org/tiny", revision=MAIN)) == "main"


def test_missing_model_error_names_the_id_and_the_offline_cache(offline_cache) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_path("org/absent")
    message = str(info.value)
    assert "'org/absent'" in message and "HF_HUB_OFFLINE" in message and offline_cache in message


def test_missing_revision_is_an_error(offline_cache) -> None:
    with pytest.raises(ModelNotFoundError, match="revision 'nope'"):
        resolve_model_path("org/tiny", revision="nope")


def test_settings_from_env() -> None:
    s = HubSettings.from_env({"HF_HOME": "/h", "HF_HUB_OFFLINE": "true", "HF_TOKEN": "t"})
    assert (s.cache_dir, s.offline, s.token) == (os.path.join("/h", "hub"), True, "t")
    s = HubSettings.from_env({"HF_HOME": "/h", "HF_HUB_CACHE": "/c"})
    assert (s.cache_dir, s.offline, s.token) == ("/c", False, None)


def test_demo_id_builds_the_demo_once(tmp_path, monkeypatch) -> None:
    calls = []

    def fake_demo(cache_dir=None):
        calls.append(cache_dir)
        return str(tmp_path)

    monkeypatch.setattr("tgi_backend.weights.demo.ensure_demo_model", fake_demo)
    monkeypatch.chdir(tmp_path)  # a folder named "demo" in the working directory would win
    assert resolve_model_path("demo") == str(tmp_path)
    assert calls == [None]
