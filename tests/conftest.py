"""Shared fixtures: the real protein data in ../shared/data (skipped with a message when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real protein data not found at {path} (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: real UniProt proteomes (FASTA) and flat-file records."""
    return _require(SHARED_DATA)


@pytest.fixture(scope="session")
def proteome_dir(shared_data: Path) -> Path:
    """Folder of gzipped UniProt reference proteomes (FASTA)."""
    return _require(shared_data / "proteomes")


@pytest.fixture(scope="session")
def uniprot_dat_dir(shared_data: Path) -> Path:
    """Folder of UniProtKB flat-file records with Pfam cross-references."""
    return _require(shared_data / "uniprot-dat")
