"""The project's copies of the reference fixtures are complete, unmodified, and current."""

from __future__ import annotations

import hashlib
import json

import pytest

from conftest import TESTS

FIXTURES = TESTS / "fixtures"
# The fixtures' upstream copy, when the project is checked out beside it (development machines).
UPSTREAM = TESTS.parent.parent / "shared" / "fixtures"
FOLDERS = ["reference", "reference-clip"]


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text())["files"]


@pytest.mark.parametrize("name", FOLDERS)
def test_every_file_matches_the_manifest(name):
    folder = FIXTURES / name
    files = manifest(folder)
    assert len(files) >= 10
    for rel, entry in files.items():
        path = folder / rel
        assert path.is_file(), f"{rel} missing from tests/fixtures/{name}"
        assert path.stat().st_size == entry["bytes"], rel
        assert sha256(path) == entry["sha256"], f"{rel} differs from the manifest"


@pytest.mark.parametrize("name", FOLDERS)
def test_no_unlisted_files(name):
    folder = FIXTURES / name
    listed = set(manifest(folder)) | {"manifest.json"}
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert present == listed


@pytest.mark.parametrize("name", FOLDERS)
def test_copy_is_current_with_upstream(name):
    upstream = UPSTREAM / name
    if not upstream.exists():
        pytest.skip("the fixtures' upstream copy is not beside this checkout (only on development machines)")
    # When the upstream fixtures change, refresh the copy: cp -r <upstream>/<name> tests/fixtures/
    assert manifest(FIXTURES / name) == manifest(upstream)
