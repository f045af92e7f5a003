"""Streams: resumed HTTP downloads, gunzip, tar members, metalinks and release resolution."""

from __future__ import annotations

import gzip
import io
import socket
import tarfile

import pytest
from uniprot_server import MirrorServer, Misbehaviour, build_release_tree, metalink_xml

from protperf.data.errors import DownloadError, FormatError
from protperf.data.stream import download_chunks, gunzip_chunks, prefetch, tar_member_chunks
from protperf.data.uniprot import parse_metalink, resolve_release


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_gunzip_members_truncation_and_corruption():
    data = bytes(range(256)) * 4000
    two = gzip.compress(data[:5000]) + gzip.compress(data[5000:])
    assert b"".join(gunzip_chunks(pieces(two, 1000), source="two.gz")) == data
    assert b"".join(gunzip_chunks([two + bytes(1024)], source="padded.gz")) == data
    with pytest.raises(FormatError, match=r"cut\.gz: truncated gzip stream"):
        list(gunzip_chunks(pieces(two[:-100], 1000), source="cut.gz"))
    broken = bytearray(gzip.compress(data))
    broken[len(broken) // 2] ^= 0xFF
    with pytest.raises(FormatError, match=r"bad\.gz: corrupt gzip data"):
        list(gunzip_chunks([bytes(broken)], source="bad.gz"))
    with pytest.raises(FormatError, match="not gzip data"):
        list(gunzip_chunks([gzip.compress(b"x") + b"garbage"], source="x.gz"))


def make_tar(members: dict[str, bytes], fmt: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_member_with_long_names(fmt):
    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "d" * 50
    members = {"reldate.txt": b"2019_01\n", f"{long_dir}/uniprot_trembl.dat.gz": b"T" * 5000}
    archive = make_tar({**members, "docs.txt": b"D" * 700}, fmt)
    out = tar_member_chunks(pieces(archive, 333), "uniprot_trembl.dat.gz", source="kb.tar")
    assert b"".join(out) == b"T" * 5000
    with pytest.raises(FormatError, match=r"kb\.tar: the archive has no member nothing.*docs"):
        list(tar_member_chunks([archive], "nothing", source="kb.tar"))
    with pytest.raises(FormatError, match="truncated tar"):
        list(tar_member_chunks([archive[:1500]], "uniprot_trembl.dat.gz", source="kb.tar"))


def test_prefetch_passes_items_and_errors():
    assert list(prefetch(iter(range(100)), depth=2)) == list(range(100))

    def failing():
        yield 1
        raise FormatError("boom")

    stream = prefetch(failing())
    assert next(stream) == 1
    with pytest.raises(FormatError, match="boom"):
        next(stream)


@pytest.fixture
def served_file(tmp_path):
    data = bytes(range(251)) * 2000  # 502 kB
    (tmp_path / "pub/databases/uniprot").mkdir(parents=True)
    (tmp_path / "pub/databases/uniprot/file.bin").write_bytes(data)
    return tmp_path, data


def test_download_resumes_after_dropped_connections(served_file):
    root, data = served_file
    faults = Misbehaviour(drops=4, drop_after=70_000)
    with MirrorServer(root, faults) as server:
        url = server.url + "file.bin"
        waits = []
        got = b"".join(download_chunks(url, size=len(data), retry_wait=0.01, sleep=waits.append))
        ranges = [r for _, r in server.requests]
    assert got == data
    assert ranges == [None, "bytes=70000-", "bytes=140000-", "bytes=210000-", "bytes=280000-"]
    assert waits == [0.01] * 4  # each failure was followed by progress: the backoff restarts


def test_download_gives_up_and_404_names_the_url(served_file):
    root, _ = served_file
    with MirrorServer(root, Misbehaviour(drops=10, drop_after=0)) as server:
        url = server.url + "file.bin"
        waits = []
        with pytest.raises(DownloadError, match="giving up after 4 failed attempts") as caught:
            b"".join(download_chunks(url, retries=3, retry_wait=0.5, sleep=waits.append))
        assert url in str(caught.value) and "at byte 0" in str(caught.value)
    assert waits == [0.5, 1.0, 2.0]  # no progress between failures: the wait doubles
    with MirrorServer(root) as server:
        with pytest.raises(DownloadError, match=r"HTTP 404") as caught:
            list(download_chunks(server.url + "missing.bin"))
        assert server.url + "missing.bin" in str(caught.value)


def test_closed_port_is_retried_then_reported(served_file):
    root, _ = served_file
    with MirrorServer(root) as server:
        url = server.url + "file.bin"
    waits, reports = [], []
    with pytest.raises(DownloadError, match="giving up after 3") as caught:
        list(
            download_chunks(url, retries=2, retry_wait=1, sleep=waits.append, report=reports.append)
        )
    assert url in str(caught.value)
    assert waits == [1, 2]
    # Every retry is announced: the URL, the error, the wait and the attempt to come.
    assert len(reports) == 2
    assert all(r.startswith(url) and "refused" in r.lower() for r in reports)
    assert "retrying in 1 s (attempt 2 of 3)" in reports[0]
    assert "retrying in 2 s (attempt 3 of 3)" in reports[1]


def _unknown_host(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def test_unknown_host_fails_at_once(monkeypatch):
    # No resolver answer for the host (a mistyped mirror, or no network): an error at once
    # naming the host, not minutes of silent retries. getaddrinfo stands in for the resolver,
    # so the test sends nothing anywhere.
    monkeypatch.setattr(socket, "getaddrinfo", _unknown_host)
    url = "http://mirror.invalid/pub/databases/uniprot/file.bin"
    waits, reports = [], []
    with pytest.raises(DownloadError, match=r"cannot resolve the host 'mirror\.invalid'") as caught:
        list(download_chunks(url, sleep=waits.append, report=reports.append))
    assert url in str(caught.value) and "nothing was downloaded" in str(caught.value)
    assert waits == [] and reports == []


def test_temporary_resolver_failure_is_retried(served_file, monkeypatch):
    root, data = served_file
    real = socket.getaddrinfo
    calls = []

    def flaky(*args, **kwargs):  # "try again" once, then the real resolver
        calls.append(args[0])
        if len(calls) == 1:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(*args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", flaky)
    with MirrorServer(root) as server:
        reports = []
        got = b"".join(
            download_chunks(server.url + "file.bin", sleep=lambda s: None, report=reports.append)
        )
    assert got == data
    assert len(reports) == 1 and "Temporary failure" in reports[0]


def test_host_lost_after_progress_is_retried(served_file, monkeypatch):
    # Once bytes have come, even "unknown host" is retried: the network went away mid-download.
    root, data = served_file
    real = socket.getaddrinfo
    calls = []

    def lost_once(*args, **kwargs):  # the second connection (the resume) finds no resolver
        calls.append(args[0])
        if len(calls) == 2:
            _unknown_host()
        return real(*args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lost_once)
    with MirrorServer(root, Misbehaviour(drops=1, drop_after=70_000)) as server:
        waits, reports = [], []
        got = b"".join(
            download_chunks(
                server.url + "file.bin", size=len(data), retry_wait=0.01, sleep=waits.append,
                report=reports.append,
            )
        )  # fmt: skip
        ranges = [r for _, r in server.requests]
    assert got == data
    assert ranges == [None, "bytes=70000-"]
    assert waits == [0.01, 0.02]  # the drop, then the resolver failure without progress
    assert "at byte 70000" in reports[1] and "Name or service not known" in reports[1]


def test_metalink_parsing():
    xml = metalink_xml("2019_01", {"knowledgebase2019_01.tar.gz": b"abc"})
    version, files = parse_metalink(xml, url="x")
    entry = files["knowledgebase2019_01.tar.gz"]
    assert version == "2019_01"
    assert (entry.size, entry.md5) == (3, "900150983cd24fb0d6963f7d28e17f72")
    with pytest.raises(FormatError, match="not a metalink"):
        parse_metalink(b"<html>", url="x")


def test_release_resolution_and_fallbacks(tmp_path):
    build_release_tree(tmp_path, b"", release="2019_01", parent="previous_releases")
    build_release_tree(tmp_path, b"", release="2015_01", parent="previous_major_releases")
    build_release_tree(tmp_path, b"", release="2024_06", parent="current_release")
    with MirrorServer(tmp_path) as server:
        recent = resolve_release("2019_01", server.url)
        major = resolve_release("2015_01", server.url)
        current = resolve_release("current", server.url)
        with pytest.raises(DownloadError) as caught:
            resolve_release("2001_01", server.url)
    assert recent.url.endswith(
        "previous_releases/release-2019_01/knowledgebase/knowledgebase2019_01.tar.gz"
    )
    assert recent.member == "uniprot_trembl.dat.gz" and len(recent.md5) == 32
    assert "previous_major_releases/release-2015_01/" in major.url
    assert current.release == "2024_06" and current.member is None
    assert current.url.endswith("current_release/knowledgebase/complete/uniprot_trembl.dat.gz")
    message = str(caught.value)
    assert "previous_releases/release-2001_01/knowledgebase/RELEASE.metalink" in message
    assert "previous_major_releases/release-2001_01/knowledgebase/RELEASE.metalink" in message
    with pytest.raises(DownloadError, match="neither 'current' nor"):
        resolve_release("2019-01", "http://127.0.0.1:9/")
    with pytest.raises(DownloadError, match="unknown mirror"):
        resolve_release("2019_01", "nowhere")
