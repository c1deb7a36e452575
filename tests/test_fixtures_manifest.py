"""The project's copy of the reference fixtures is complete, unmodified, and current."""

from __future__ import annotations

import hashlib
import json

import pytest

from conftest import REF, TESTS

SHARED = TESTS.parent.parent / "shared" / "fixtures" / "reference"


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text())["files"]


def test_every_file_matches_the_manifest():
    files = manifest(REF)
    assert len(files) >= 20
    for name, entry in files.items():
        path = REF / name
        assert path.is_file(), f"{name} missing from tests/fixtures/reference"
        assert path.stat().st_size == entry["bytes"], name
        assert sha256(path) == entry["sha256"], f"{name} differs from the manifest"


def test_no_unlisted_files():
    listed = set(manifest(REF)) | {"manifest.json"}
    present = {str(p.relative_to(REF)) for p in REF.rglob("*") if p.is_file()}
    assert present == listed


@pytest.mark.skipif(not SHARED.exists(), reason="../shared is not beside this checkout")
def test_copy_is_current_with_shared():
    # When ../shared's fixtures change, refresh the copy: cp -r ../shared/fixtures/reference tests/fixtures/
    assert manifest(REF) == manifest(SHARED)
