"""README.md and docs/ cannot rot: every command they show runs here, offline, on real proteins.

Their ```bash blocks are split into commands and run; their ```python blocks are executed, and
what a Python block prints is compared with the ```text block right after it (doctest's rules:
``...`` matches anything, runs of whitespace are equal). A block preceded by
``<!-- readme-test: skip (reason) -->`` is not run (downloads, GPUs, Docker, ``make demo``
itself, long benchmarks); every skip must give its reason.

Each block runs in a fresh copy of a workspace laid out as the README assumes after ``make demo``
(the project root with ``configs/``, ``demo/data``, ``demo/run``, ``demo/sample.fasta``,
``demo/embeddings.h5``, and ``../shared/data`` beside it), only smaller: the dataset is built by
``protperf prepare-data`` from a few hundred real proteins with the demo's options, so that its
first records are the demo's, and ``demo/run`` has the demo's architecture (configs/tiny-cpu.yaml)
trained for a few steps on short crops, so that the shapes a block prints are the demo's.
``protperf`` commands run in this process through ``protperf.cli.main``; ``protperf train`` gets
the tests' tiny model and a few steps appended (they win over the README's), so that it takes
seconds. After each command the files the README promises are checked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import doctest
import gzip
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from protperf import cli

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
#: Every file whose examples run: the README, then the docs.
DOCUMENTS = [README, *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^```(\S*)\s*$")
SKIP = re.compile(r"^<!--\s*readme-test:\s*skip\b(.*?)-->\s*$")
RUNNABLE = ("bash", "python")
SHELL_OPERATORS = {"|", "||", "&", "&&", ";", ">", ">>", "<", "2>", "&>"}

#: Appended to every README `protperf train`: the tiny model of the tests, a few steps.
TRAIN_STEPS = 4
RESUME_STEPS = 6
#: What the demo's outputs are built from here: the first records of the demo's proteomes.
BACTERIA_RECORDS, YEAST_RECORDS, SAMPLE_RECORDS = 400, 40, 200
#: A Python block's output against the ```text block after it.
OUTPUT_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@dataclass(frozen=True)
class Block:
    """A fenced code block of README.md or of a file in docs/."""

    id: str  # document + section heading + index within the section
    language: str
    code: str
    line: int  # 1-based line of the opening fence
    skip: str | None  # the skip marker's text, None when the block runs
    document: str = "README.md"
    output: str | None = None  # the ```text block right after a ```python block: what it prints


def _slug(heading: str) -> str:
    """``prepare-data: UniProt into HDF5`` -> ``prepare-data``; ``Data layout`` -> ``data-layout``."""
    return re.sub(r"[^a-z0-9]+", "-", heading.split(":")[0].lower()).strip("-") or "top"


def readme_blocks(text: str, document: str = "README.md") -> list[Block]:
    """Every fenced block of ``text``, with its section, skip marker and, for a ```python block
    followed (blank lines apart) by a ```text block, that block as its expected output."""
    lines = text.splitlines()
    prefix = _slug(Path(document).stem)
    found: list[tuple[Block, int]] = []  # each block and the line after its closing fence
    heading, index_in_section = "top", 0
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading, index_in_section = line.lstrip("#").strip(), 0
        match = FENCE.match(line)
        if match:
            start = i
            i += 1
            body = []
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            previous = lines[start - 1] if start else ""
            skip = SKIP.match(previous)
            block = Block(
                id=f"{prefix}-{_slug(heading)}-{index_in_section}",
                language=match.group(1),
                code="\n".join(body) + "\n",
                line=start + 1,
                skip=skip.group(1).strip() if skip else None,
                document=document,
            )
            found.append((block, i + 1))
            index_in_section += 1
        i += 1
    blocks = []
    for number, (block, after) in enumerate(found):
        following = found[number + 1][0] if number + 1 < len(found) else None
        if (
            block.language == "python"
            and following is not None
            and following.language == "text"
            and all(not line.strip() for line in lines[after : following.line - 1])
        ):
            block = dataclasses.replace(block, output=following.code)
        blocks.append(block)
    return blocks


def bash_commands(code: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blanks dropped."""
    commands, pending = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command = (pending + line).strip()
        pending = ""
        if command and not command.startswith("#"):
            commands.append(command)
    return commands


def _uses_shell(command: str) -> bool:
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return any(token in SHELL_OPERATORS for token in lexer)


BLOCKS = readme_blocks(README.read_text())
ALL_BLOCKS = [
    block
    for document in DOCUMENTS
    for block in readme_blocks(document.read_text(), str(document.relative_to(REPO)))
]
RUN_BLOCKS = [block for block in ALL_BLOCKS if block.language in RUNNABLE and block.skip is None]


# ---------------------------------------------------------------------------------------------
# The workspace: the project root as `make demo` leaves it, small
# ---------------------------------------------------------------------------------------------


def _first_records(fasta_gz: Path, count: int) -> str:
    out, seen = [], 0
    with gzip.open(fasta_gz, "rt") as handle:
        for line in handle:
            if line.startswith(">"):
                seen += 1
                if seen > count:
                    break
            out.append(line)
    return "".join(out)


def _run_protperf(argv: list[str]) -> tuple[int, str, str]:
    """``protperf ARGV`` in this process; returns (exit status, standard output, standard
    error)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            status = cli.main(argv)
        except SystemExit as stop:  # argparse exits on --help and on errors
            status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return status, stdout.getvalue(), stderr.getvalue()


#: The tests' tiny model's architecture options, which the workspace's demo run leaves out: it
#: keeps the demo's (configs/tiny-cpu.yaml), so that the shapes the README prints are the demo's.
_ARCHITECTURE = ("--model.dim", "--model.depth", "--model.heads", "--model.ff_dim",
                 "--model.num_features")  # fmt: skip


def _shrink_train(argv: list[str], *, keep_architecture: bool = False) -> list[str]:
    """A README `protperf train` made tiny: the tests' model and a few steps appended.

    ``--resume`` gets only the steps: the run's saved config.yaml already holds its shrunk
    settings, and another architecture would not load its checkpoint.
    """
    from lm_models import TINY_TRAIN_ARGS

    if "--resume" in argv:
        return [*argv, f"--trainer.max_steps={RESUME_STEPS}", "--trainer.limit_test_batches=2"]
    tiny = list(TINY_TRAIN_ARGS)
    if "--concat" in argv:  # the crop length is the dataset's chunk length there
        tiny = [arg for arg in tiny if not arg.startswith("--model.max_length")]
    if keep_architecture:
        tiny = [arg for arg in tiny if not arg.startswith(_ARCHITECTURE)]
    return [*argv, *tiny, f"--trainer.max_steps={TRAIN_STEPS}", "--trainer.limit_test_batches=2"]


@contextlib.contextmanager
def _one_thread_in(directory: Path):
    import torch

    threads, cwd = torch.get_num_threads(), Path.cwd()
    torch.set_num_threads(1)
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def readme_workspace(tmp_path_factory, proteome_dir: Path) -> Path:
    """A folder holding ``project/`` (where README commands run) and ``shared/data``."""
    root = tmp_path_factory.mktemp("readme")
    (root / "shared").mkdir()
    (root / "shared" / "data").symlink_to(proteome_dir.parent, target_is_directory=True)
    project = root / "project"
    (project / "demo").mkdir(parents=True)
    (project / "configs").symlink_to(REPO / "configs", target_is_directory=True)

    inputs = root / "inputs"
    inputs.mkdir()
    ecoli = proteome_dir / "UP000000625-E.coli.fasta.gz"
    yeast = proteome_dir / "UP000002311-S.cerevisiae.fasta.gz"
    (inputs / "bacteria.fasta").write_text(_first_records(ecoli, BACTERIA_RECORDS))
    (inputs / "yeast.fasta").write_text(_first_records(yeast, YEAST_RECORDS))
    (project / "demo" / "sample.fasta").write_text(_first_records(ecoli, SAMPLE_RECORDS))

    # What scripts/demo.sh does, at the size of a test: its prepare-data options (a sequence's
    # split depends on its residues and the fractions only, so the first train records are the
    # demo's) and its model, trained for a few steps.
    steps = [
        ["prepare-data", "--source", str(inputs / "bacteria.fasta"), "--ood-source",
         str(inputs / "yeast.fasta"), "--out", "demo/data", "--concat-length", "1024",
         "--valid-fraction", "0.05", "--test-fraction", "0.05", "--ood-families", "none",
         "--quiet"],
        _shrink_train(["train", "--config", "configs/tiny-cpu.yaml", "--data", "demo/data",
                       "--run-dir", "demo/run", "--no-test"], keep_architecture=True),
        ["embed", "demo/sample.fasta", "--model", "demo/run", "-o", "demo/embeddings.h5",
         "--per-residue"],
        ["generate", "--model", "demo/run", "-n", "3", "-o", "demo/generated.fasta"],
    ]  # fmt: skip
    with _one_thread_in(project):
        for argv in steps:
            status, _, err_text = _run_protperf(argv)
            assert status == 0, f"workspace: protperf {shlex.join(argv)} failed:\n{err_text}"
    return root


@pytest.fixture
def workspace(readme_workspace: Path, tmp_path: Path, single_torch_thread) -> Path:
    """A fresh copy of the workspace; the current folder is its project root meanwhile."""
    root = tmp_path / "ws"
    shutil.copytree(readme_workspace, root, symlinks=True)
    project = root / "project"
    cwd = Path.cwd()
    os.chdir(project)
    try:
        yield project
    finally:
        os.chdir(cwd)


# ---------------------------------------------------------------------------------------------
# What each verb promises
# ---------------------------------------------------------------------------------------------


def _option(argv: list[str], *names: str, default: str | None = None) -> str | None:
    """The value of the last ``--name value`` / ``--name=value`` in ``argv`` (any spelling)."""
    wanted = {name.replace("_", "-") for name in names}
    value = default
    for i, arg in enumerate(argv):
        name, equals, inline = arg.partition("=")
        if name.replace("_", "-") in wanted:
            value = inline if equals else (argv[i + 1] if i + 1 < len(argv) else None)
    return value


def _check_prepare_data(argv: list[str], out_text: str) -> None:
    release = _option(argv, "--release")
    out = Path(_option(argv, "--out", default=f"data/{release or 'custom'}"))
    manifest = json.loads((out / "manifest.json").read_text())
    for split in ("train", "valid", "test", "ood"):
        assert (out / f"{split}.h5").is_file()
    assert (out / "tokenizer.json").is_file()
    assert manifest["splits"]["train"]["sequences"] > 0
    if "--ood-source" in argv or "--ood_source" in argv:
        assert manifest["splits"]["ood"]["sequences"] > 0


def _check_train(argv: list[str], before: set[Path], out_text: str) -> Path | None:
    """Checks a finished `protperf train`; returns its run folder (None for --print-config)."""
    if any(arg.split("=")[0].replace("_", "-") == "--print-config" for arg in argv):
        assert "model:" in out_text
        return None
    run_dir = _option(argv, "--run-dir")
    if run_dir is None and "--resume" in argv:  # the saved config names it
        import yaml

        config = _option(argv, "--config")
        run_dir = yaml.safe_load(Path(config).read_text())["run_dir"]
    if run_dir is None:  # the default, runs/<config>-<uni|bi>: the one that appeared
        new = {p.parent.parent for p in Path().glob("runs/*/export/config.json")} - before
        assert len(new) == 1, f"expected one new run folder under runs/, found {sorted(new)}"
        run_dir = new.pop()
    run = Path(run_dir)
    for name in ("config.yaml", "checkpoints/last.ckpt", "export/model.safetensors",
                 "export/config.json", "export/tokenizer.json", "curves.png"):  # fmt: skip
        assert (run / name).is_file(), f"{run / name} missing"
    exported = json.loads((run / "export" / "config.json").read_text())
    steps = RESUME_STEPS if "--resume" in argv else TRAIN_STEPS
    assert exported["step"] == steps
    assert exported["mode"] == ("bidirectional" if "--bidirectional" in argv else "unidirectional")
    if "--wandb" in argv:
        assert list(run.glob("wandb/offline-run-*/*.wandb")), "no offline wandb run"
    return run


def _check_evaluate(argv: list[str], out_text: str) -> None:
    if _option(argv, "--format") == "json":
        assert json.loads(out_text)
    else:
        assert "| type | set" in out_text and "unigram baseline" in out_text


def _check_embed(argv: list[str], out_text: str) -> None:
    import h5py

    fasta = Path(argv[1])
    out = Path(_option(argv, "-o", "--out", default=fasta.with_suffix(".h5").name))
    with h5py.File(out, "r") as f:
        n = f["mean"].shape[0]
        assert n == len(f["ids"]) == fasta.read_text().count(">") > 0
        if "--per-residue" in argv:
            assert f["offsets"].shape == (n + 1,)
            assert f["residues"].shape[0] == f["offsets"][-1]


def _check_generate(argv: list[str], out_text: str) -> None:
    count = int(_option(argv, "-n", "--num", default="10"))
    out = _option(argv, "-o", "--out")
    text = Path(out).read_text() if out else out_text
    assert text.count(">") == count
    prompt = _option(argv, "--prompt")
    if prompt:
        sequences = [s.split("\n", 1)[1].replace("\n", "") for s in text.split(">")[1:]]
        assert all(seq.startswith(prompt.upper()) for seq in sequences)


def _check_plot(argv: list[str], out_text: str) -> None:
    out = _option(argv, "--out") or str(Path(argv[1]) / "curves.png")
    assert Path(out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _check_export(argv: list[str], out_text: str) -> None:
    out = Path(argv[2])
    assert f"wrote {out}" in out_text
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def _check_score(argv: list[str], out_text: str) -> None:
    import csv

    from protperf.fasta import read_fasta
    from protperf.score import default_score_output

    fasta, mutations = Path(argv[1]), _option(argv, "--mutations")
    default = default_score_output(fasta, mutations=mutations is not None)
    out = Path(_option(argv, "-o", "--out", default=str(default)))
    assert out_text == f"{out}\n"
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t" if out.suffix == ".tsv" else ","))
    if mutations is None:
        records, _ = read_fasta(fasta)
        assert [row["id"] for row in rows] == [record.id for record in records]
        assert all(float(row["log_likelihood"]) < 0 for row in rows)
    else:
        with open(mutations, newline="") as handle:
            given = [row for row in csv.DictReader(handle) if any(row.values())]
        assert [(row["id"], row["mutation"]) for row in rows] == [
            (row["id"], row["mutation"]) for row in given
        ]


def _check_probe(argv: list[str], out_text: str) -> None:
    """`probe fit`: the probe folder and, with --test, the report's figures; `probe predict`:
    one row per protein, in FASTA order."""
    import csv

    from protperf.fasta import read_fasta
    from protperf.probe import default_predictions

    if argv[1] == "fit":
        out = Path(_option(argv, "-o", "--out"))
        assert sorted(p.name for p in out.iterdir()) == [
            "probe.json", "probe.safetensors", "report.json", "report.md"]  # fmt: skip
        assert out_text == (out / "report.md").read_text()
        if _option(argv, "--test"):
            assert json.loads((out / "report.json").read_text())["figures"]["embeddings"]
        return
    fasta = Path(argv[3])
    out = Path(_option(argv, "-o", "--out", default=str(default_predictions(fasta))))
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["id"] for row in rows] == [record.id for record in read_fasta(fasta)[0]]


def run_protperf_command(argv: list[str]) -> tuple[str, str]:
    """Run a README `protperf ...` (argv without the program name) and check its promises;
    returns what it printed on standard output and standard error."""
    verb = argv[0]
    before = {p.parent.parent for p in Path().glob("runs/*/export/config.json")}
    run_argv = _shrink_train(argv) if verb == "train" else argv
    # wandb's service and exit hooks stay out of the test process, and --devices starts
    # processes that run the command line again (sys.argv: pytest's, in this process).
    if "--wandb" in argv or "--devices" in argv:
        done = subprocess.run(
            [sys.executable, "-m", "protperf.cli", *run_argv],
            env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        status, out_text, err_text = done.returncode, done.stdout, done.stderr
    else:
        status, out_text, err_text = _run_protperf(run_argv)
    assert status == 0, (
        f"protperf {shlex.join(run_argv)} exited with {status}:\n{out_text}\n{err_text}"
    )
    if "-h" in argv or "--help" in argv:
        return out_text, err_text
    if verb == "prepare-data":
        _check_prepare_data(argv, out_text)
    elif verb == "train":
        _check_train(run_argv, before, out_text)
    elif verb == "evaluate":
        _check_evaluate(argv, out_text)
    elif verb == "embed":
        _check_embed(argv, out_text)
    elif verb == "generate":
        _check_generate(argv, out_text)
    elif verb == "plot":
        _check_plot(argv, out_text)
    elif verb == "score":
        _check_score(argv, out_text)
    elif verb == "probe":
        _check_probe(argv, out_text)
    elif verb == "export":
        _check_export(argv, out_text)
    return out_text, err_text


def run_shell_command(command: str) -> None:
    """Anything else (or a command with pipes and redirections): bash, in the workspace."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-c", f"set -euo pipefail\n{command}"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------


def run_python_block(block: Block) -> str:
    """Execute a Python block as a script; returns what it printed."""
    code = compile(block.code, f"{block.document}:{block.line + 1}", "exec")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code, {"__name__": "__readme__"})
    return printed.getvalue()


def check_output(block: Block, printed: str) -> None:
    """What a Python block printed against the ```text block the document shows after it."""
    checker = doctest.OutputChecker()
    if not checker.check_output(block.output, printed, OUTPUT_FLAGS):
        example = doctest.Example(block.code, block.output)
        difference = checker.output_difference(example, printed, OUTPUT_FLAGS)
        raise AssertionError(f"{block.document}:{block.line}: the output shown is not what the "
                             f"block prints\n{difference}")  # fmt: skip


def run_bash_block(block: Block) -> None:
    for command in bash_commands(block.code):
        words = shlex.split(command, comments=True)
        if words[0] == "protperf" and not _uses_shell(command):
            run_protperf_command(words[1:])
        else:
            assert not (words[0] == "protperf" and words[1] == "train"), (
                f"{block.document}: `protperf train` with pipes or redirections cannot be shrunk "
                "for the test"
            )
            run_shell_command(command)


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[block.id for block in RUN_BLOCKS])
def test_readme_block_runs(block: Block, workspace: Path) -> None:
    """Every runnable block of README.md and docs/ runs as written (train shrunk), keeps its
    promises, and a Python block prints what the document shows after it."""
    if block.language == "python":
        printed = run_python_block(block)
        if block.output is not None:
            check_output(block, printed)
    else:
        run_bash_block(block)


def _three_commands() -> list[list[str]]:
    """The README's three commands (prepare-data a release, train, embed), as argv lists."""
    for block in BLOCKS:
        commands = bash_commands(block.code) if block.language == "bash" else []
        if commands and commands[0].startswith("protperf prepare-data --release"):
            assert block.skip, "the release download must stay out of the test"
            return [shlex.split(command, comments=True)[1:] for command in commands]
    raise AssertionError("README shows no `protperf prepare-data --release ...` block")


def test_readme_three_commands_find_their_inputs(workspace: Path) -> None:
    """The README's `train` and `embed` after `prepare-data --release`, with no paths given:
    train finds the one dataset under ./data (and names them all when there are several), embed
    takes the newest export under ./runs and says which model it used."""
    prepare, train, embed = _three_commands()
    release = _option(prepare, "--release")
    assert train[0] == "train" and not _option(train, "--data"), train
    assert embed[0] == "embed" and not _option(embed, "--model"), embed
    # What `prepare-data --release` leaves behind, and the user's FASTA file.
    shutil.copytree("demo/data", f"data/{release}")
    shutil.copy("demo/sample.fasta", embed[1])

    shutil.copytree("demo/data", "data/other")
    status, _, err_text = _run_protperf(_shrink_train(train))
    assert status != 0, "train with two datasets under ./data and no --data must refuse"
    assert f"data/{release}" in err_text and "data/other" in err_text and "--data" in err_text, (
        err_text
    )
    assert not Path("runs").exists() or not any(Path("runs").iterdir()), "nothing may be written"
    shutil.rmtree("data/other")

    run_protperf_command(train)
    (run,) = {p.parent.parent for p in Path().glob("runs/*/export/config.json")}
    out_text, err_text = run_protperf_command(embed)
    out_text += err_text
    assert Path(embed[1]).with_suffix(".h5").is_file()
    assert str(run) in out_text or run.name in out_text, f"embed does not name {run}:\n{out_text}"


def test_python_blocks_show_their_output() -> None:
    """A Python block that prints is followed by the ```text block of what it prints."""
    printing = [b for b in RUN_BLOCKS if b.language == "python" and "print(" in b.code]
    missing = [f"{b.document}:{b.line}" for b in printing if b.output is None]
    assert not missing, f"Python blocks that print with no ```text block after them: {missing}"


def test_readme_has_runnable_blocks() -> None:
    readme_blocks_run = [block for block in RUN_BLOCKS if block.document == "README.md"]
    languages = {block.language for block in readme_blocks_run}
    assert languages == {"bash", "python"}, languages
    verbs_run = {
        shlex.split(command)[1]
        for block in readme_blocks_run
        if block.language == "bash"
        for command in bash_commands(block.code)
        if command.startswith("protperf ")
    }
    assert verbs_run >= set(cli.VERBS), f"README runs no example of {set(cli.VERBS) - verbs_run}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=[d.name for d in DOCUMENTS])
def test_skip_markers_give_a_reason_and_precede_a_fence(document: Path) -> None:
    lines = document.read_text().splitlines()
    name = document.relative_to(REPO)
    for number, line in enumerate(lines, 1):
        if not (line.lstrip().startswith("<!--") and "readme-test" in line):
            continue  # prose may name the marker
        match = SKIP.match(line)
        assert match, f"{name}:{number}: malformed marker {line!r}"
        reason = re.fullmatch(r"\s*\((.+)\)\s*", match.group(1))
        assert reason and reason.group(1).strip(), f"{name}:{number}: skip without (reason)"
        following = lines[number] if number < len(lines) else ""
        assert FENCE.match(following), f"{name}:{number}: no code fence on the next line"


def _verbs_mentioned(text: str, blocks: list[Block]) -> set[str]:
    bash = "\n".join(block.code for block in blocks if block.language == "bash")
    mentioned = set(re.findall(r"^\s*(?:srun\s+)?protperf ([a-z][a-z-]*)", bash, re.M))
    mentioned |= set(re.findall(r"-m protperf\.cli ([a-z][a-z-]*)", bash))
    mentioned |= set(re.findall(r"`protperf ([a-z][a-z-]*)", text))
    return mentioned


def test_readme_mentions_only_real_verbs() -> None:
    mentioned = _verbs_mentioned(README.read_text(), BLOCKS)
    assert mentioned, "README shows no protperf command"
    undocumented = set(cli.VERBS) - mentioned
    assert not undocumented, f"verbs missing from README: {undocumented}"
    for document in DOCUMENTS:
        text = document.read_text()
        unknown = _verbs_mentioned(text, readme_blocks(text)) - set(cli.VERBS)
        assert not unknown, f"{document.name} mentions verbs `protperf --help` lacks: {unknown}"


def test_readme_test_command_is_the_ci_and_make_one() -> None:
    """README, .ci/run and the Makefile run the suite with the same command."""
    command = "python -m pytest -q"
    assert command in README.read_text()
    assert command in (REPO / ".ci" / "run").read_text()
    assert command in (REPO / "Makefile").read_text()
