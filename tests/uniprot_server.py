"""A UniProt-style mirror on 127.0.0.1 for tests and benchmarks: a release tree and an HTTP server.

:func:`build_release_tree` lays out, under ``root/pub/databases/uniprot/``, what the real FTP
holds for a release (``previous_releases/release-YYYY_MM/knowledgebase/knowledgebaseYYYY_MM.tar.gz``
with ``uniprot_trembl.dat.gz``, ``uniprot_sprot.dat.gz`` and ``reldate.txt`` inside, beside a
``RELEASE.metalink`` with the archive's real size and md5), or the ``current_release`` layout.

:class:`MirrorServer` serves it with ``http.server`` in a thread, honours ``Range: bytes=N-``,
and can misbehave on purpose: drop the connection mid-body N times, flip a byte, answer 404,
or throttle. Run as a script to serve a folder: ``python tests/uniprot_server.py ROOT``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import re
import tarfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BASE_PATH = "pub/databases/uniprot/"


def metalink_xml(version: str, files: dict[str, bytes | Path]) -> bytes:
    """A RELEASE.metalink (metalink 3.0) listing ``files`` with their real size and md5."""
    entries = []
    for name, content in files.items():
        size, md5 = _size_md5(content)
        entries.append(
            f'    <file name="{name}">\n'
            f"      <size>{size}</size>\n"
            f'      <verification><hash type="md5">{md5}</hash></verification>\n'
            "      <resources>\n"
            f'        <url location="ch" type="ftp">ftp://ftp.expasy.org/databases/uniprot/{name}</url>\n'
            "      </resources>\n"
            "    </file>\n"
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<metalink version="3.0" xmlns="http://www.metalinker.org/">\n'
        "  <publisher><name>UniProt Consortium</name></publisher>\n"
        f"  <version>{version}</version>\n"
        "  <files>\n" + "".join(entries) + "  </files>\n</metalink>\n"
    ).encode()


def _size_md5(content: bytes | Path) -> tuple[int, str]:
    if isinstance(content, Path):
        digest = hashlib.md5()
        with open(content, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
        return content.stat().st_size, digest.hexdigest()
    return len(content), hashlib.md5(content).hexdigest()


def _tar_add(archive: tarfile.TarFile, name: str, content: bytes | Path) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 1_548_288_000  # 2019-01-24, fixed so that archives are reproducible
    info.mode = 0o644
    if isinstance(content, Path):
        info.size = content.stat().st_size
        with open(content, "rb") as handle:
            archive.addfile(info, handle)
    else:
        info.size = len(content)
        archive.addfile(info, io.BytesIO(content))


@dataclass
class ReleaseTree:
    """What :func:`build_release_tree` wrote: the archive's path, size and md5, and its URL path."""

    root: Path
    archive: Path
    url_path: str
    size: int
    md5: str


def build_release_tree(
    root: Path,
    trembl: bytes | Path,
    *,
    release: str = "2019_01",
    parent: str = "previous_releases",
    sprot: bytes = b"",
    trembl_gz_level: int = 6,
) -> ReleaseTree:
    """Write a UniProt release layout under ``root`` with ``trembl`` as TrEMBL's flat file.

    ``parent``: ``previous_releases``, ``previous_major_releases`` or ``current_release`` (then
    ``uniprot_trembl.dat.gz`` sits in ``current_release/knowledgebase/complete/``). ``trembl``
    may be the flat file's bytes or the path of an already gzipped ``.dat.gz``.
    """
    base = Path(root) / BASE_PATH
    if isinstance(trembl, Path):
        trembl_gz: bytes | Path = trembl
    else:
        trembl_gz = gzip.compress(trembl, compresslevel=trembl_gz_level, mtime=0)
    if parent == "current_release":
        folder = base / "current_release/knowledgebase/complete"
        folder.mkdir(parents=True, exist_ok=True)
        archive = folder / "uniprot_trembl.dat.gz"
        if isinstance(trembl_gz, Path):
            archive.write_bytes(trembl_gz.read_bytes())
        else:
            archive.write_bytes(trembl_gz)
    else:
        folder = base / f"{parent}/release-{release}/knowledgebase"
        folder.mkdir(parents=True, exist_ok=True)
        archive = folder / f"knowledgebase{release}.tar.gz"
        with (
            open(archive, "wb") as raw,
            gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as compressed,
            tarfile.open(fileobj=compressed, mode="w|", format=tarfile.GNU_FORMAT) as tar,
        ):
            _tar_add(tar, "reldate.txt", f"UniProt Knowledgebase Release {release}\n".encode())
            _tar_add(tar, "uniprot_sprot.dat.gz", gzip.compress(sprot, mtime=0))
            _tar_add(tar, "uniprot_trembl.dat.gz", trembl_gz)
    (folder / "RELEASE.metalink").write_bytes(metalink_xml(release, {archive.name: archive}))
    size, md5 = _size_md5(archive)
    return ReleaseTree(Path(root), archive, archive.relative_to(root).as_posix(), size, md5)


@dataclass
class Misbehaviour:
    """How the server misbehaves. Counters go down as faults are served."""

    drops: int = 0  #: connections to cut in the middle of a body
    drop_after: int = 100_000  #: body bytes sent before each cut
    flip_offset: int | None = None  #: file offset of a byte sent XOR 0xFF ...
    flip_path: str = r"\.gz$"  #: ... in the files whose URL path matches this regex
    missing: set[str] = field(default_factory=set)  #: URL paths (regex) answered with 404
    throttle: float | None = None  #: bytes per second, to make downloads slow on purpose


class MirrorServer:
    """Serves ``root`` on 127.0.0.1 (a free port) in a thread; use as a context manager.

    ``url`` is the base URL to pass as ``--mirror`` (``.../pub/databases/uniprot/``).
    ``bytes_sent`` and ``requests`` record what was served.
    """

    def __init__(self, root: Path, misbehaviour: Misbehaviour | None = None) -> None:
        self.root = Path(root).resolve()
        self.faults = misbehaviour or Misbehaviour()
        self.bytes_sent = 0
        self.requests: list[tuple[str, str | None]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                server._serve(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/{BASE_PATH}"

    def __enter__(self) -> MirrorServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?", 1)[0].lstrip("/")
        range_header = handler.headers.get("Range")
        with self._lock:
            self.requests.append((path, range_header))
        target = (self.root / path).resolve()
        faults = self.faults
        if (
            any(re.search(pattern, path) for pattern in faults.missing)
            or not target.is_relative_to(self.root)
            or not target.is_file()
        ):
            handler.send_error(404, "Not Found")
            return
        size = target.stat().st_size
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if match:
            start = int(match.group(1))
            if start >= size:
                handler.send_error(416, "Range Not Satisfiable")
                return
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            handler.send_response(200)
        handler.send_header("Content-Length", str(size - start))
        handler.send_header("Accept-Ranges", "bytes")
        handler.end_headers()
        with self._lock:
            drop = faults.drops > 0 and size - start > faults.drop_after
            if drop:
                faults.drops -= 1
        sent = 0
        with open(target, "rb") as handle:
            flip = faults.flip_offset
            if not drop and not faults.throttle and (flip is None or flip < start):
                handler.wfile.flush()  # well-behaved: let the kernel send the file
                try:
                    sent = handler.connection.sendfile(handle, offset=start, count=size - start)
                except (BrokenPipeError, ConnectionResetError):
                    return
                with self._lock:
                    self.bytes_sent += sent
                return
            handle.seek(start)
            while True:
                piece = handle.read(1 << 16)
                if not piece:
                    break
                if drop and sent + len(piece) > faults.drop_after:
                    piece = piece[: faults.drop_after - sent]
                offset = start + sent
                flip = faults.flip_offset
                if (
                    flip is not None
                    and offset <= flip < offset + len(piece)
                    and re.search(faults.flip_path, path)
                ):
                    data = bytearray(piece)
                    data[flip - offset] ^= 0xFF
                    piece = bytes(data)
                try:
                    handler.wfile.write(piece)
                except (BrokenPipeError, ConnectionResetError):
                    return
                sent += len(piece)
                with self._lock:
                    self.bytes_sent += len(piece)
                if faults.throttle:
                    time.sleep(len(piece) / faults.throttle)
                if drop and sent >= faults.drop_after:
                    handler.wfile.flush()
                    handler.close_connection = True
                    return


def main() -> None:
    """Serve a folder (``ROOT/pub/databases/uniprot/...``) until killed; print the mirror URL."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    args = parser.parse_args()
    with MirrorServer(args.root) as server:
        print(server.url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
