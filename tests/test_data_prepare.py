"""``protperf prepare-data`` end to end, from a UniProt-style mirror on 127.0.0.1 or local files."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from Bio import SeqIO, SwissProt
from tokenizers import Tokenizer
from uniprot_server import MirrorServer, Misbehaviour, build_release_tree

from protperf import prepare, tokenizer
from protperf.data import publish
from protperf.data.build import SPLITS, concat_order, sequence_hashes
from protperf.data.h5 import read_split
from protperf.prepare import main

DAT_FILES = ["emboss_trembl.dat", "emboss_swissprot_100.dat", "biopython_multi_ex.dat"]
HELD_OUT = "PF00001"  # 7tm_1: present in the shared flat files (the paper's families are not)
SPLIT_OPTIONS = ["--valid-fraction", "0.15", "--test-fraction", "0.15", "--concat-length", "512"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trembl(uniprot_dat_dir) -> bytes:
    """The shared flat files, one after the other, as the release's TrEMBL flat file."""
    return b"".join((uniprot_dat_dir / name).read_bytes() for name in DAT_FILES)


@pytest.fixture(scope="module")
def reference(uniprot_dat_dir) -> list[tuple[str, str, bool]]:
    """(accession, sequence, held out) of every record, read by Biopython."""
    records = []
    for name in DAT_FILES:
        with open(uniprot_dat_dir / name) as handle:
            for record in SwissProt.parse(handle):
                pfam = {ref[1] for ref in record.cross_references if ref[0] == "Pfam"}
                records.append((record.accessions[0], record.sequence, HELD_OUT in pfam))
    return records


@pytest.fixture(scope="module")
def mirror(tmp_path_factory, trembl, uniprot_dat_dir) -> Path:
    root = tmp_path_factory.mktemp("mirror")
    sprot = (uniprot_dat_dir / "biopython_multi_ex.dat").read_bytes()
    build_release_tree(root, trembl, release="2019_01", sprot=sprot)
    build_release_tree(root, trembl, release="2016_01", parent="previous_major_releases")
    build_release_tree(root, trembl, release="2024_06", parent="current_release")
    return root


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    status = main([*argv, "--retry-wait", "0.01"])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def read_all(folder: Path) -> dict[str, list[tuple[str, str]]]:
    found = {}
    for name in SPLITS:
        data = read_split(folder / f"{name}.h5")
        found[name] = [
            (data.accessions[i], tokenizer.decode(data.sequence(i))) for i in range(len(data))
        ]
    return found


def test_release_from_mirror_decodes_to_the_input(mirror, reference, capsys, tmp_path):
    out = tmp_path / "2019_01"
    with MirrorServer(mirror) as server:
        status, stdout, _ = run(
            ["--release", "2019_01", "--mirror", server.url, "--out", str(out),
             "--ood-families", HELD_OUT, *SPLIT_OPTIONS],
            capsys,
        )  # fmt: skip
    assert status == 0, stdout
    assert f"wrote {out}/" in stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "ood.h5", "test.h5", "tokenizer.json", "train.h5", "valid.h5",
    ]  # fmt: skip
    found = read_all(out)
    # Every unique input sequence exactly once, under the accession of its first copy.
    first_copy: dict[str, str] = {}
    for accession, sequence, _ in reference:
        first_copy.setdefault(sequence, accession)
    written = [item for items in found.values() for item in items]
    assert sorted(seq for _, seq in written) == sorted(first_copy)
    assert all(first_copy[seq] == accession for accession, seq in written)
    # OOD: exactly the sequences with the held-out family, and nowhere else.
    held = {seq for _, seq, flag in reference if flag}
    assert {seq for _, seq in found["ood"]} == held and len(held) >= 10
    assert not held & {seq for name in ("train", "valid", "test") for _, seq in found[name]}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["release"] == "2019_01"
    assert manifest["records_read"] == len(reference)
    assert manifest["duplicates_dropped"] == len(reference) - len(first_copy) > 0
    assert manifest["unique_sequences"] == len(first_copy)
    assert manifest["held_out_pfam_families"] == [HELD_OUT]
    (source,) = manifest["sources"]
    assert source["md5_verified"] and source["md5"] == source["md5_expected"]
    assert source["url"].endswith(
        "previous_releases/release-2019_01/knowledgebase/knowledgebase2019_01.tar.gz"
    )
    lengths = [len(seq) for seq in first_copy]
    assert manifest["lengths"]["min"] == min(lengths)
    assert manifest["lengths"]["max"] == max(lengths)
    assert manifest["lengths"]["median"] == float(np.median(lengths))
    for name in SPLITS:
        split = manifest["splits"][name]
        assert split["sequences"] == len(found[name])
        with h5py.File(out / f"{name}.h5") as handle:
            assert handle.attrs["split"] == name
            assert handle.attrs["num_sequences"] == len(found[name])
            assert handle.attrs["num_tokens"] == sum(len(seq) for _, seq in found[name])
            assert handle["tokens"].dtype == np.uint8 and handle["offsets"].dtype == np.int64
            assert handle["concat"].shape == (split["concat_chunks"], 512)
    # tokenizer.json reproduces the ids in the files.
    hf = Tokenizer.from_file(str(out / "tokenizer.json"))
    train = read_split(out / "train.h5")
    ids = hf.encode(found["train"][0][1]).ids
    assert ids == [tokenizer.BOS, *train.sequence(0).tolist(), tokenizer.EOS]


def test_concat_chunks_are_the_shuffled_sequences_joined_by_eos(mirror, capsys, tmp_path):
    out = tmp_path / "out"
    with MirrorServer(mirror) as server:
        status, _, _ = run(
            ["--mirror", server.url, "--out", str(out), "--seed", "5", "--ood-families", HELD_OUT,
             "--concat-length", "100", "--valid-fraction", "0.2", "--test-fraction", "0.2"],
            capsys,
        )  # fmt: skip
    assert status == 0
    for name in SPLITS:
        data = read_split(out / f"{name}.h5")
        lengths = np.diff(data.offsets)
        order = concat_order(sequence_hashes(data.tokens, lengths), 5)
        stream = np.concatenate([np.append(data.sequence(i), tokenizer.EOS) for i in order]).astype(
            np.uint8
        )
        rows = (lengths.sum() + len(lengths)) // 100
        assert data.concat.shape == (rows, 100) and rows > 0
        np.testing.assert_array_equal(data.concat.reshape(-1), stream[: rows * 100])
        assert (data.concat == tokenizer.EOS).sum() == (stream[: rows * 100] == tokenizer.EOS).sum()


def test_dropped_connections_resume(mirror, reference, capsys, tmp_path):
    faults = Misbehaviour(drops=5, drop_after=40_000)
    with MirrorServer(mirror, faults) as server:
        status, _, err = run(
            ["--mirror", server.url, "--out", str(tmp_path / "o"), "--quiet"], capsys
        )
        ranges = [r for path, r in server.requests if path.endswith(".tar.gz")]
    assert status == 0, err
    assert ranges == [None] + [f"bytes={40_000 * k}-" for k in range(1, 6)]
    manifest = json.loads((tmp_path / "o/manifest.json").read_text())
    assert manifest["sources"][0]["md5_verified"]
    assert manifest["records_read"] == len(reference)


@pytest.mark.parametrize("offset", [4, 150_000])  # the gzip header's mtime; deflate data
def test_flipped_byte_fails_and_publishes_nothing(mirror, capsys, tmp_path, offset):
    out = tmp_path / "out"
    with MirrorServer(mirror, Misbehaviour(flip_offset=offset)) as server:
        status, _, err = run(["--mirror", server.url, "--out", str(out), "--quiet"], capsys)
    assert status == 1
    assert "checksum error" in err or "corrupt gzip data" in err
    if offset == 4:  # gzip does not check the mtime: only the md5 can catch this one
        assert "checksum error: md5" in err and "knowledgebase2019_01.tar.gz" in err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_missing_release_and_404_name_the_urls(mirror, capsys, tmp_path):
    with MirrorServer(mirror, Misbehaviour(missing={r"\.tar\.gz$"})) as server:
        status, _, err = run(["--release", "2019_01", "--mirror", server.url,
                              "--out", str(tmp_path / "a")], capsys)  # fmt: skip
        assert status == 1
        assert "HTTP 404" in err and "knowledgebase2019_01.tar.gz" in err
        status, _, err = run(["--release", "1999_01", "--mirror", server.url,
                              "--out", str(tmp_path / "b")], capsys)  # fmt: skip
    assert status == 1
    assert f"{server.url}previous_releases/release-1999_01/knowledgebase/RELEASE.metalink" in err
    assert f"{server.url}previous_major_releases/release-1999_01/" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_major_release_fallback_current_and_keep_download(mirror, capsys, tmp_path):
    keep = tmp_path / "downloads"
    with MirrorServer(mirror) as server:
        status, _, err = run(["--release", "2016_01", "--mirror", server.url, "--max-sequences",
                              "20", "--out", str(tmp_path / "old")], capsys)  # fmt: skip
        assert status == 0, err
        status, _, err = run(["--release", "current", "--mirror", server.url, "--keep-download",
                              str(keep), "--out", str(tmp_path / "cur")], capsys)  # fmt: skip
        assert status == 0, err
    old = json.loads((tmp_path / "old/manifest.json").read_text())
    assert "previous_major_releases/release-2016_01" in old["sources"][0]["url"]
    assert old["records_read"] == 20 and not old["sources"][0]["md5_verified"]
    current = json.loads((tmp_path / "cur/manifest.json").read_text())
    assert current["release"] == "2024_06" and current["sources"][0]["md5_verified"]
    assert (keep / "uniprot_trembl.dat.gz").is_file() and not list(keep.glob("*.part"))
    # The kept file is read again without any network: the server is gone now.
    status, _, err = run(["--release", "current", "--mirror", server.url, "--keep-download",
                          str(keep), "--out", str(tmp_path / "again"), "--retries", "1"], capsys)  # fmt: skip
    assert status == 1 and "RELEASE.metalink" in err  # resolving the release needs the mirror
    with MirrorServer(mirror, Misbehaviour(missing={r"\.dat\.gz$"})) as server:
        status, _, err = run(["--release", "current", "--mirror", server.url, "--keep-download",
                              str(keep), "--out", str(tmp_path / "again")], capsys)  # fmt: skip
    assert status == 0, err
    for name in SPLITS:
        a, b = (
            read_split(tmp_path / "cur" / f"{name}.h5"),
            read_split(tmp_path / "again" / f"{name}.h5"),
        )
        np.testing.assert_array_equal(a.tokens, b.tokens)


def test_existing_output_is_not_overwritten_silently(uniprot_dat_dir, capsys, tmp_path):
    out = tmp_path / "out"
    dat = uniprot_dat_dir / "emboss_trembl.dat"
    assert run(["--source", str(dat), "--out", str(out)], capsys)[0] == 0
    status, _, err = run(["--source", str(dat), "--out", str(out)], capsys)
    assert status == 1 and "--overwrite" in err
    first = (out / "train.h5").stat().st_mtime_ns
    assert run(["--source", str(dat), "--out", str(out), "--overwrite"], capsys)[0] == 0
    assert (out / "train.h5").stat().st_mtime_ns != first and not (tmp_path / "out.old").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep me")
    status, _, err = run(
        ["--source", str(dat), "--out", str(tmp_path / "mine"), "--overwrite"], capsys
    )
    assert status == 1 and "not a prepare-data output" in err
    assert (tmp_path / "mine/notes.txt").read_text() == "keep me"


def test_option_spellings(uniprot_dat_dir, capsys, tmp_path):
    """Lists as several values or one JSON list; --max_sequences reads as --max-sequences; a
    bad JSON list and an abbreviated option are refused."""
    dats = [str(uniprot_dat_dir / name) for name in DAT_FILES[:2]]
    spaced, listed = tmp_path / "spaced", tmp_path / "listed"
    assert run(["--source", *dats, "--out", str(spaced), "--quiet"], capsys)[0] == 0
    argv = ["--source", json.dumps(dats), "--out", str(listed), "--max_sequences", "7"]
    assert run([*argv, "--quiet"], capsys)[0] == 0
    spaced_manifest = json.loads((spaced / "manifest.json").read_text())
    listed_manifest = json.loads((listed / "manifest.json").read_text())
    assert [entry["url"] for entry in spaced_manifest["sources"]] == dats
    assert listed_manifest["sources"][0]["url"] == dats[0]
    assert listed_manifest["max_sequences"] == listed_manifest["records_read"] == 7
    status, _, err = run(["--source", '["a.dat", ', "--out", str(tmp_path / "x")], capsys)
    assert status == 2 and not (tmp_path / "x").exists()
    assert err.strip() == (
        "protperf prepare-data: error: argument --source: '[\"a.dat\", ' is not a YAML or JSON "
        "list (see protperf prepare-data --help)"
    )
    assert main(["--source", dats[0], "--out", str(tmp_path / "y"), "--max-seq", "3"]) == 2
    assert not (tmp_path / "y").exists()
    assert "unrecognized arguments: --max-seq" in capsys.readouterr().err


def test_an_output_moved_aside_by_a_killed_run_is_put_back(uniprot_dat_dir, capsys, tmp_path):
    """A run with --overwrite killed between moving the earlier output aside and renaming its
    own into place leaves ``.out.<pid>.old`` and no ``out``: the next run restores it first."""
    out = tmp_path / "out"
    dat = uniprot_dat_dir / "emboss_trembl.dat"
    assert run(["--source", str(dat), "--out", str(out)], capsys)[0] == 0
    manifest = (out / "manifest.json").read_text()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid whose process is gone
    out.rename(tmp_path / f".out.{child.pid}.old")
    status, _, err = run(["--source", str(dat), "--out", str(out)], capsys)
    assert status == 1 and "--overwrite" in err  # the earlier output is back, not replaced
    assert (out / "manifest.json").read_text() == manifest
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_fasta_proteomes_with_pfam_map(proteome_dir, capsys, tmp_path):
    files = [proteome_dir / f"{name}.fasta.gz" for name in
             ("UP000001014-S.typhimurium", "UP000008962-S.typhimurium", "UP000002717-S.elongatus")]  # fmt: skip
    records = []
    for path in files:
        with gzip.open(path, "rt") as handle:
            records += [(r.id.split("|")[1], str(r.seq)) for r in SeqIO.parse(handle, "fasta")]
    held = [records[i][0] for i in range(0, 3000, 100)]
    pfam_map = tmp_path / "pfam.tsv"
    pfam_map.write_text("Entry\tPfam\n" + "".join(f"{a}\tPF00005;{HELD_OUT};\n" for a in held))
    out = tmp_path / "proteomes"
    status, _, err = run(
        ["--source", *map(str, files), "--pfam-map", str(pfam_map), "--ood-families", HELD_OUT,
         "--out", str(out), "--valid-fraction", "0.05", "--test-fraction", "0.05"],
        capsys,
    )  # fmt: skip
    assert status == 0, err
    found = read_all(out)
    first_copy: dict[str, str] = {}
    for accession, sequence in records:
        first_copy.setdefault(sequence.upper().replace("*", "X"), accession)
    written = [item for items in found.values() for item in items]
    assert len(written) == len(first_copy) < len(records)  # the two Salmonella proteomes overlap
    assert {seq for _, seq in written} == set(first_copy)
    held_sequences = {seq for acc, seq in records if acc in set(held)}
    assert {seq for _, seq in found["ood"]} == held_sequences
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["release"] == "custom" and len(manifest["sources"]) == 3
    assert manifest["duplicates_dropped"] == len(records) - len(first_copy)


def test_ood_source_holds_out_whole_organisms(proteome_dir, capsys, tmp_path):
    def sequences(path):
        with gzip.open(path, "rt") as handle:
            return {str(r.seq).upper().replace("*", "X") for r in SeqIO.parse(handle, "fasta")}

    held = proteome_dir / "UP000008962-S.typhimurium.fasta.gz"  # overlaps the other Salmonella
    kept = [proteome_dir / f"{name}.fasta.gz" for name in
            ("UP000001014-S.typhimurium", "UP000002717-S.elongatus")]  # fmt: skip
    out = tmp_path / "organisms"
    status, _, err = run(
        ["--source", *map(str, kept), "--ood-source", str(held), "--ood-families", "none",
         "--out", str(out), "--valid-fraction", "0.05", "--test-fraction", "0.05"],
        capsys,
    )  # fmt: skip
    assert status == 0, err
    found = {split: {seq for _, seq in items} for split, items in read_all(out).items()}
    held_sequences = sequences(held)
    shared = held_sequences & sequences(kept[0])
    assert len(shared) > 1000  # two strains: most proteins are identical
    assert found["ood"] == held_sequences
    assert not held_sequences & (found["train"] | found["valid"] | found["test"])
    assert (
        found["train"] | found["valid"] | found["test"]
        == (sequences(kept[0]) | sequences(kept[1])) - held_sequences
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert [source["ood"] for source in manifest["sources"]] == [True, False, False]
    assert manifest["sources"][0]["url"].endswith(held.name)
    status, _, err = run(["--ood-source", str(held), "--out", str(tmp_path / "x")], capsys)
    assert status == 1 and "--ood-source needs --source" in err


def test_a_bad_input_leaves_nothing_while_the_tokenizer_is_still_being_written(
    proteome_dir, capsys, tmp_path, monkeypatch
):
    """The tokenizer's file is written by a thread into the staging folder; an error in the
    input removes that folder only once the thread is done, or the thread could write into it
    while it is being removed (rmtree empties it, the thread writes, the folder stays)."""
    save = prepare._save_tokenizer_json
    remove = shutil.rmtree

    def slow(path: Path) -> None:  # a writer still at work when the input fails
        for _ in range(20):
            save(path)
            time.sleep(0.05)

    def removal_taking_time(path, ignore_errors=False):
        """rmtree's steps: the files, then the folder (which fails if a file came back)."""
        for child in Path(path).iterdir():
            child.unlink() if child.is_file() else remove(child)
        time.sleep(0.2)  # a slow file system between the files and the folder itself
        try:
            os.rmdir(path)
        except OSError:
            if not ignore_errors:
                raise

    monkeypatch.setattr(prepare, "_save_tokenizer_json", slow)
    monkeypatch.setattr(publish.shutil, "rmtree", removal_taking_time)
    bad = tmp_path / "cut.fasta.gz"
    whole = sorted(proteome_dir.glob("*E.coli*.fasta.gz"))[0].read_bytes()
    bad.write_bytes(whole[: len(whole) // 4])  # fails when a quarter of it has been read
    status, _, err = run(["--source", str(bad), "--out", str(tmp_path / "out")], capsys)
    assert status == 1 and "cut.fasta.gz" in err and "truncated gzip" in err
    time.sleep(1.2)  # after the thread's last write, had it outlived the run
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cut.fasta.gz"]


def test_malformed_inputs_give_clear_errors(uniprot_dat_dir, proteome_dir, capsys, tmp_path):
    good = (uniprot_dat_dir / "emboss_trembl.dat").read_bytes()
    truncated = tmp_path / "cut.dat.gz"
    truncated.write_bytes(gzip.compress(good)[:-50])
    no_sequence = tmp_path / "noseq.dat"
    records = good.split(b"//\n")
    sq = records[2].index(b"SQ   ")
    records[2] = records[2][: records[2].index(b"\n", sq) + 1]
    accession = records[2].split(b"\nAC   ", 1)[1].split(b";", 1)[0].decode()
    no_sequence.write_bytes(b"//\n".join(records))
    text = tmp_path / "notes.txt"
    text.write_text("these are not sequences\n")
    cases = [
        (truncated, ["cut.dat.gz", "truncated gzip"]),
        (no_sequence, ["noseq.dat", "record 3", accession, "empty sequence"]),
        (text, ["notes.txt", "neither a UniProt flat file"]),
        (tmp_path / "missing.fasta", ["missing.fasta", "no such file"]),
    ]
    for path, words in cases:
        out = tmp_path / f"out-{path.name}"
        status, _, err = run(["--source", str(path), "--out", str(out)], capsys)
        assert status == 1, path
        for word in words:
            assert word in err, (word, err)
        assert not out.exists() and not Path(f"{out}.partial").exists()


def test_kill_mid_run_then_rerun_gives_the_complete_result(mirror, capsys, tmp_path):
    common = ["--ood-families", HELD_OUT, *SPLIT_OPTIONS]
    size = (next(mirror.rglob("knowledgebase2019_01.tar.gz"))).stat().st_size
    out = tmp_path / "killed"
    with MirrorServer(mirror) as server:
        assert (
            run(["--mirror", server.url, "--out", str(tmp_path / "clean"), *common], capsys)[0] == 0
        )
        server.faults.throttle = size / 3  # a 3-second download
        sent = server.bytes_sent
        command = [sys.executable, "-m", "protperf.cli", "prepare-data", "--mirror", server.url,
                   "--out", str(out), "--quiet", *common]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        process = subprocess.Popen(command, cwd=REPO, env=env)
        deadline = time.monotonic() + 60
        while server.bytes_sent - sent < size // 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert Path(f"{out}.partial").is_dir()
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL
        assert server.bytes_sent - sent < size  # killed mid-download
        assert not out.exists()  # nothing that looks finished
        server.faults.throttle = None
        rerun = subprocess.run(command, cwd=REPO, env=env)
    assert rerun.returncode == 0
    assert not Path(f"{out}.partial").exists()
    clean = json.loads((tmp_path / "clean/manifest.json").read_text())
    again = json.loads((out / "manifest.json").read_text())
    for manifest in (clean, again):
        del manifest["elapsed_seconds"]
    assert clean == again
    for name in SPLITS:
        a, b = read_split(tmp_path / "clean" / f"{name}.h5"), read_split(out / f"{name}.h5")
        for field in ("tokens", "offsets", "concat"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        assert a.accessions == b.accessions and a.attrs == b.attrs
        assert (tmp_path / "clean" / f"{name}.h5").read_bytes() == (out / f"{name}.h5").read_bytes()


def test_fasta_source_by_url_with_max_sequences(proteome_dir, capsys, tmp_path):
    served = tmp_path / "served" / "pub/databases/uniprot"
    served.mkdir(parents=True)
    name = "UP000002717-S.elongatus.fasta.gz"
    (served / name).write_bytes((proteome_dir / name).read_bytes())
    with MirrorServer(tmp_path / "served", Misbehaviour(drops=2, drop_after=100_000)) as server:
        status, _, err = run(
            ["--source", server.url + name, "--out", str(tmp_path / "o"), "--quiet"], capsys
        )
        assert status == 0, err
        status, _, err = run(
            ["--source", server.url + name, "--out", str(tmp_path / "few"), "--quiet",
             "--max-sequences", "100"],
            capsys,
        )  # fmt: skip
        assert status == 0, err
    manifest = json.loads((tmp_path / "o/manifest.json").read_text())
    assert manifest["records_read"] == 2658 and manifest["sources"][0]["url"].endswith(name)
    assert manifest["sources"][0]["bytes"] == (proteome_dir / name).stat().st_size
    few = json.loads((tmp_path / "few/manifest.json").read_text())
    assert few["records_read"] == 100 and few["max_sequences"] == 100


def test_a_split_left_empty_by_too_few_sequences_is_a_warning(capsys, tmp_path):
    fasta = tmp_path / "few.fasta"
    fasta.write_text("".join(f">p{i}\n{'MKTAYIAKQR'[: 3 + i]}W\n" for i in range(6)))
    status, _, err = run(
        ["--source", str(fasta), "--out", str(tmp_path / "out"), "--quiet"], capsys
    )
    assert status == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    for split in ("valid", "test"):
        empty = manifest["splits"][split]["sequences"] == 0
        fraction = manifest[f"{split}_fraction"]
        warning = (
            f"protperf prepare-data: warning: the {split} split is empty: 6 sequences to split "
            f"and --{split}-fraction {fraction:g} expect {6 * fraction:.2g} in it; give more "
            f"sequences or a larger --{split}-fraction"
        )
        assert (warning in err.splitlines()) == empty, err
    assert manifest["splits"]["valid"]["sequences"] == 0  # 6 x 0.000966: almost surely
    status, _, err = run(
        ["--source", str(fasta), "--out", str(tmp_path / "split"), "--quiet",
         "--valid-fraction", "0.5", "--test-fraction", "0.5"],
        capsys,
    )  # fmt: skip
    assert status == 0 and "warning" not in err
