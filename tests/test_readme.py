"""Issue 26 item 5: every code block of README.md runs in a test as written.

`test_every_block_is_run_by_a_test` finds every fenced block and the test that runs it (here, or the
README tests of tests/test_api.py and tests/test_fairseq_cli.py), so a new block without a test fails.
Blocks run as written in a fresh working folder, with only tiny stand-ins for the inputs a user brings
(`corpus.txt`) and, where a line trains for minutes, a size cap appended (`--steps 2`, `--limit 40
--epochs 1`: each test says which). What cannot run here (`make test` is the whole suite; a second
machine) is checked as far as it can be: make's dry run, every option against `--help`."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from attnmask.cli import app
from attnmask.store.stores import read_patterns
from conftest import random_texts

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)

# (section, language, index of the block among that section's blocks of the language): the test running it
RUN_BY = {
    ("Set-up: two commands", "sh", 0): "tests/test_readme.py::test_setup_block",
    ("Command line", "text", 0): "tests/test_readme.py::test_command_line_synopsis_matches_help",
    ("Distributed collection", "bash", 0): "tests/test_readme.py::test_distributed_collection_block",
    ("Token pruning", "python", 0): "tests/test_readme.py::test_token_pruning_block_runs",
    ("Transformer-XL", "sh", 0): "tests/test_readme.py::test_transformer_xl_block_runs",
    ("Compact encoders", "sh", 0): "tests/test_readme.py::test_compact_block_runs",
    ("fairseq translation Transformers", "sh", 0): "tests/test_fairseq_cli.py::test_readme_recipe_runs_as_written",
    ("Python API", "python", 0): "tests/test_api.py::test_readme_examples_run",
    ("Python API", "python", 1): "tests/test_api.py::test_readme_examples_run",
}


def readme_blocks() -> dict[tuple[str, str, int], str]:
    """{(section, language, index): text} of every fenced block of README.md; the section is the title of
    the `## ` heading above the block."""
    text = (REPO / "README.md").read_text()
    blocks, seen = {}, {}
    for match in BLOCK.finditer(text):
        headings = re.findall(r"^## (.+)$", text[:match.start()], re.M)
        section = headings[-1].strip() if headings else ""
        key = (section, match.group(1))
        seen[key] = seen.get(key, -1) + 1
        blocks[(section, match.group(1), seen[key])] = match.group(2)
    return blocks


def block(section: str, language: str, index: int = 0) -> str:
    return readme_blocks()[(section, language, index)]


def commands(text: str) -> list[str]:
    """The command lines of a shell block: comments dropped, `\\` continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line for line in (re.sub(r"\s+#.*$", "", raw).strip() for raw in joined.splitlines())
            if line and not line.startswith("#")]


def shell(line: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run one README line with bash in `cwd`, the venv's commands first on PATH."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def help_text(command: str) -> str:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    return result.output


def options_exist(line: str) -> None:
    """Every --option of an `attnmask CMD ...` line (before a `--` that passes the rest on) is one of CMD's."""
    words = shlex.split(line)
    start = words.index("attnmask")
    command, rest = words[start + 1], words[start + 2:]
    rest = rest[:rest.index("--")] if "--" in rest else rest
    known = help_text(command)
    for word in rest:
        if word.startswith("--"):
            assert re.search(rf"{re.escape(word.split('=')[0])}\b", known), f"{line}: {word} is not an option of {command}"


def test_every_block_is_run_by_a_test():
    blocks = readme_blocks()
    assert set(blocks) == set(RUN_BY), f"README blocks without a test: {sorted(set(blocks) - set(RUN_BY))}; " \
                                       f"tests of blocks that are gone: {sorted(set(RUN_BY) - set(blocks))}"
    for where in set(RUN_BY.values()):
        path, name = where.split("::")
        assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), where


def test_setup_block():
    """`make demo` and `make test` install and run everything (minutes, the whole suite): not run here;
    make resolves both targets (a dry run) and they are the block's two commands."""
    lines = commands(block("Set-up: two commands", "sh"))
    assert lines == ["make demo", "make test"]
    r = subprocess.run(["make", "-n", "demo", "test"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def synopsis(text: str) -> list[str]:
    """The command lines of the synopsis: continuation lines (indented) joined, comments dropped."""
    lines = []
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw.startswith(" ") and lines:
            lines[-1] += " " + raw.strip()
        else:
            lines.append(re.sub(r"\s+#.*$", "", raw.strip()))
    return lines


def test_command_line_synopsis_matches_help():
    """Every command of the synopsis exists and every option it lists is in that command's --help."""
    lines = synopsis(block("Command line", "text"))
    assert len(lines) >= 15
    for line in lines:
        words = line.split()
        if words[0] == "torchrun":
            assert "-m attnmask" in line
            continue
        assert words[0] == "attnmask", line
        if words[1].startswith("-"):  # global options (`attnmask --version`, `attnmask -h | attnmask COMMAND -h`)
            for part in line.split("|"):
                args = [("compile" if w == "COMMAND" else w) for w in part.split()[1:]]
                result = CliRunner().invoke(app, args)
                assert result.exit_code == 0 and result.stdout.strip(), (part, result.output)
            continue
        known = help_text(words[1])
        for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line):
            assert re.search(rf"{option}\b", known), f"{line}: {option} is not an option of {words[1]}"


def test_distributed_collection_block(tmp_path):
    """The one-machine command runs as written on a small corpus.txt (4 processes share the CPU) and writes
    the store; the two-machine command needs two hosts: its options are checked."""
    first, second = commands(block("Distributed collection", "bash"))
    (tmp_path / "corpus.txt").write_text("\n".join(random_texts(12, seed=4)) + "\n")
    r = shell(first, tmp_path)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert read_patterns(tmp_path / "patterns" / "big.zarr").attrs["sequences"] == 12
    assert "--nnodes 2" in second and "--rdzv-endpoint host0:29500" in second
    options_exist(second.split("-m ", 1)[1])


def test_token_pruning_block_runs(tmp_path):
    code = block("Token pruning", "python")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    kept, logits = r.stdout.strip().splitlines()
    expected = re.search(r"# real tokens entering each layer: (\[.*\])", code).group(1)
    assert kept == expected  # the comment says what it prints
    assert logits == f"torch.Size([2, 2]) {expected}"  # the classifier's body prunes the same tokens


def test_transformer_xl_block_runs(tmp_path):
    """The recipe in order, as written, with `--steps 2` on its two `train` lines (training the small
    Transformer-XL on the whole play takes over 5 minutes here): from scratch on the built-in `hamlet`,
    collected, compiled, trained with the masks, and evaluated on the held-out split."""
    lines = commands(block("Transformer-XL", "sh"))
    assert [line.split()[1] for line in lines] == ["train", "collect", "compile", "train", "eval"]
    outputs = []
    for line in lines:
        small = line + (" --steps 2" if line.split()[1] == "train" else "")
        r = shell(small, tmp_path)
        assert r.returncode == 0, (small, r.stdout[-2000:], r.stderr[-2000:])
        outputs.append(r.stdout)
    assert (tmp_path / "runs" / "txl-masked").is_dir()
    assert "valid" in outputs[-1] and "perplexity" in outputs[-1].lower()


def test_compact_block_runs(tmp_path):
    """The block in order, as written, on a small corpus.txt; the classify lines get `--limit 40 --epochs
    1` (the whole Rotten Tomatoes would take many minutes), and the last line's pattern store is
    collected first, as `attnmask collect minilm rotten-tomatoes` names it (`--limit 40`)."""
    lines = commands(block("Compact encoders", "sh"))
    (tmp_path / "corpus.txt").write_text("\n".join(random_texts(16, seed=5, lo=3, hi=20)) + "\n")
    r = shell("attnmask collect minilm rotten-tomatoes --limit 40 --max-length 32", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "patterns" / "minilm-rotten-tomatoes.zarr").is_dir()
    for line in lines:
        small = line + (" --limit 40 --epochs 1" if "--task classify" in line else "")
        r = shell(small, tmp_path)
        assert r.returncode == 0, (small, r.stdout[-2000:], r.stderr[-2000:])
    assert (tmp_path / "runs" / "minilm-compact" / "compact.json").is_file()
    assert (tmp_path / "runs" / "rt-compact" / "compact.json").is_file()
