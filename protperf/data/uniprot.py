"""UniProt releases: mirrors, release folders, and the size and md5 in ``RELEASE.metalink``.

``current`` is ``current_release/knowledgebase/complete/uniprot_trembl.dat.gz``; a past release
``YYYY_MM`` is the ``uniprot_trembl.dat.gz`` member of
``previous_releases/release-YYYY_MM/knowledgebase/knowledgebaseYYYY_MM.tar.gz``, or of the same
path under ``previous_major_releases/`` where UniProt moved it. Both folders hold a
``RELEASE.metalink`` (XML, namespace http://www.metalinker.org/) with each file's size and md5.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass

from protperf.data.errors import DownloadError, FormatError
from protperf.data.stream import fetch_bytes, is_url

#: Mirror name -> base URL of UniProt's ``databases/uniprot`` folder.
MIRRORS: dict[str, str] = {
    "uniprot": "https://ftp.uniprot.org/pub/databases/uniprot/",
    "ebi": "https://ftp.ebi.ac.uk/pub/databases/uniprot/",
    "expasy": "https://ftp.expasy.org/databases/uniprot/",
}
TREMBL_MEMBER = "uniprot_trembl.dat.gz"
_METALINK_NS = "{http://www.metalinker.org/}"


@dataclass(frozen=True)
class MetalinkFile:
    """One ``<file>`` of a RELEASE.metalink: name, size in bytes, md5 (hex) and mirror URLs."""

    name: str
    size: int | None
    md5: str | None
    urls: tuple[str, ...]


@dataclass(frozen=True)
class ReleaseArchive:
    """What to download for a release: ``url`` (size and md5 from ``metalink_url``).

    ``member`` is the tar member holding TrEMBL's flat file, or None when ``url`` is that file.
    """

    release: str
    url: str
    size: int | None
    md5: str | None
    member: str | None
    metalink_url: str

    @property
    def name(self) -> str:
        """The archive's file name (the last part of its URL)."""
        return self.url.rsplit("/", 1)[-1]


def mirror_base(mirror: str) -> str:
    """A mirror name (``uniprot``, ``ebi``, ``expasy``) or a base URL -> base URL ending in ``/``."""
    if mirror in MIRRORS:
        return MIRRORS[mirror]
    if not is_url(mirror):
        raise DownloadError(
            f"unknown mirror {mirror!r}: use one of {sorted(MIRRORS)} or a URL of the folder "
            "that holds current_release/ and previous_releases/"
        )
    return mirror if mirror.endswith("/") else mirror + "/"


def parse_metalink(data: bytes, *, url: str) -> tuple[str | None, dict[str, MetalinkFile]]:
    """RELEASE.metalink bytes -> (release version or None, {file name: MetalinkFile})."""
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as error:
        raise FormatError(f"{url}: not a metalink XML file ({error})") from error

    def find(node: ElementTree.Element, path: str) -> ElementTree.Element | None:
        return node.find(path.replace("m:", _METALINK_NS))

    version_node = find(root, "m:version")
    version = version_node.text.strip() if version_node is not None and version_node.text else None
    files: dict[str, MetalinkFile] = {}
    for node in root.iter(f"{_METALINK_NS}file"):
        name = node.get("name", "")
        size_node = find(node, "m:size")
        md5_node = find(node, "m:verification/m:hash[@type='md5']")
        urls = tuple(
            (u.text or "").strip() for u in node.iter(f"{_METALINK_NS}url") if u.text is not None
        )
        files[name] = MetalinkFile(
            name=name,
            size=int(size_node.text) if size_node is not None and size_node.text else None,
            md5=md5_node.text.strip().lower() if md5_node is not None and md5_node.text else None,
            urls=urls,
        )
    if not files:
        raise FormatError(f"{url}: the metalink lists no files")
    return version, files


def release_folders(release: str, base: str) -> list[tuple[str, str]]:
    """Candidate (folder URL, archive name) pairs for ``release``, in the order they are tried."""
    if release == "current":
        return [(f"{base}current_release/knowledgebase/complete/", TREMBL_MEMBER)]
    if not re.fullmatch(r"\d{4}_\d{2}", release):
        raise DownloadError(f"release {release!r} is neither 'current' nor of the form YYYY_MM")
    archive = f"knowledgebase{release}.tar.gz"
    return [
        (f"{base}{parent}/release-{release}/knowledgebase/", archive)
        for parent in ("previous_releases", "previous_major_releases")
    ]


def resolve_release(
    release: str, mirror: str = "uniprot", *, retries: int = 8, retry_wait: float = 1.0
) -> ReleaseArchive:
    """Find ``release`` on ``mirror``; returns the archive URL with its size and md5.

    Tries each folder of :func:`release_folders` in turn (a 404 moves on to the next) and raises
    :class:`DownloadError` naming every URL tried when none has a metalink listing the archive.
    """
    tried: list[str] = []
    for folder, archive in release_folders(release, mirror_base(mirror)):
        metalink_url = folder + "RELEASE.metalink"
        try:
            data = fetch_bytes(metalink_url, retries=retries, retry_wait=retry_wait)
        except DownloadError as error:
            if "HTTP 404" not in str(error) and "HTTP 403" not in str(error):
                raise
            tried.append(f"{metalink_url} (not found)")
            continue
        version, files = parse_metalink(data, url=metalink_url)
        if archive not in files:
            tried.append(f"{metalink_url} (lists no {archive}; it lists {sorted(files)})")
            continue
        entry = files[archive]
        name = release if release != "current" else (version or "current")
        return ReleaseArchive(
            release=name,
            url=folder + archive,
            size=entry.size,
            md5=entry.md5,
            member=None if archive == TREMBL_MEMBER else TREMBL_MEMBER,
            metalink_url=metalink_url,
        )
    raise DownloadError(f"UniProt release {release} not found; tried: " + "; ".join(tried))
