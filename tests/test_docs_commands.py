"""The docs cannot drift from the code: every command README.md and docs/*.md show is checked.

- every `clipdistill VERB ...` command (also `.venv/bin/clipdistill`, `python -m clipdistill`,
  `torchrun ... -m clipdistill`) in a fenced code block or an inline code span parses with the
  verb's real argparse parser (`cli.build_parser`), abbreviations off, so a renamed or removed
  flag, a removed choice or an unknown verb fails here, naming the file and line. Parsing only:
  nothing runs, so placeholders such as `my-pool` or `classes.txt` are fine (a config's own
  checks, e.g. that a file exists, are not run);
- every `make TARGET` names a target of the Makefile;
- the names a ```python block imports from clipdistill exist, and the keywords it passes to a
  config dataclass are its fields;
- every relative link points to a file that exists, and an `#anchor` to a heading of that file;
- the `next:` command `clipdistill make-pool` prints (run on a 10-image pool) is the one the docs
  show.

Runs in seconds: nothing trains; the modules the python examples import are imported."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import io
import re
import shlex
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from clipdistill.cli import VERBS, _top_parser, build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# docs/search.md is written by the engineer who owns `clipdistill search` (issue 26); README.md
# and docs/own-classifier.md link to it. It must exist: `test_the_search_page_exists` fails until
# it does (the link checks skip links to it meanwhile, so that one test says it once).
SEARCH_PAGE = ROOT / "docs" / "search.md"

FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "text"}
OPERATORS = {"&&", "||", ";", "|", "&"}
REDIRECTS = re.compile(r"^\d?(>>?|<)(&\d)?$")
ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the block's first content line
    lang: str
    text: str


@dataclass
class Command:
    where: str  # FILE:LINE
    argv: list[str]  # what follows `clipdistill`, or `make`
    name_only: bool = False  # `clipdistill VERB` in prose names the verb: only the verb is checked


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def split_markdown(path: Path) -> tuple[list[Block], list[tuple[int, str]]]:
    """The fenced code blocks of a Markdown file, and its other lines (numbered) as prose."""
    blocks: list[Block] = []
    prose: list[tuple[int, str]] = []
    fence = None
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence, lang, start, body = m.group(2), m.group(3).lower(), n + 1, []
        elif fence is not None and line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
            blocks.append(Block(path, start, lang, "\n".join(body)))
            fence = None
        elif fence is not None:
            body.append(line)
        else:
            prose.append((n, line))
    assert fence is None, f"{_rel(path)}: a code block opened at line {start - 1} is never closed"
    return blocks, prose


def _logical_lines(text: str, first: int) -> list[tuple[int, str]]:
    """Lines with backslash continuations joined, each with the number of its first line."""
    out: list[tuple[int, str]] = []
    buf, start = "", first
    for k, line in enumerate(text.splitlines()):
        if not buf:
            start = first + k
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((start, buf + line))
        buf = ""
    if buf:
        out.append((start, buf))
    return out


def _words(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lex.whitespace_split = True
    lex.commenters = "#"
    return list(lex)


def _simple_commands(words: list[str]) -> list[list[str]]:
    """Split at ; && || | &, and drop redirections with their targets."""
    cmds: list[list[str]] = [[]]
    skip = False
    for w in words:
        if skip:
            skip = False
        elif w in OPERATORS:
            cmds.append([])
        elif REDIRECTS.match(w):
            skip = True
        else:
            cmds[-1].append(w)
    return [c for c in cmds if c]


def _expand(word: str, env: dict[str, str]) -> list[str]:
    """$NAME from an assignment earlier in the same block; others stay as they are."""
    if not VARIABLE.search(word):
        return [word]
    new = VARIABLE.sub(lambda m: env.get(m.group(1) or m.group(2), m.group(0)), word)
    return _words(new) if new != word and any(c.isspace() for c in new) else [new]


def _clipdistill_argv(words: list[str]) -> list[str] | None:
    """What follows the program in a clipdistill invocation, or None when it is none."""
    first = words[0]
    if first == "clipdistill" or first.endswith("/clipdistill"):
        return words[1:]
    for k in range(len(words) - 1):  # python -m clipdistill, torchrun ... -m clipdistill
        if words[k] == "-m" and words[k + 1] == "clipdistill":
            return words[k + 2:]
    return None


def _shell_commands(path: Path, first_line: int, text: str, env: dict[str, str]) -> tuple[list[Command], list[Command]]:
    cli, make = [], []
    for line_no, line in _logical_lines(text, first_line):
        if "clipdistill" not in line and not re.search(r"\bmake\b", line) and not ASSIGNMENT.match(line.strip()):
            continue  # prose in a plain block (a folder layout, a diagram, an output)
        try:
            words = _words(line)
        except ValueError as e:  # an unclosed quote: a typo in the docs
            raise AssertionError(f"{_rel(path)}:{line_no}: cannot split {line!r}: {e}") from None
        for cmd in _simple_commands(words):
            while cmd and ASSIGNMENT.match(cmd[0]):  # NAME=value [NAME=value ...] [command]
                name, value = ASSIGNMENT.match(cmd[0]).groups()
                env[name] = " ".join(w for v in _words(value) or [""] for w in _expand(v, env))
                cmd = cmd[1:]
            if not cmd:
                continue
            cmd = [w for word in cmd for w in _expand(word, env)]
            where = f"{_rel(path)}:{line_no}"
            argv = _clipdistill_argv(cmd)
            if argv is not None:
                cli.append(Command(where, argv))
            elif cmd[0] == "make":
                make.append(Command(where, cmd[1:]))
    return cli, make


def collect() -> tuple[list[Command], list[Command], list[Block]]:
    cli: list[Command] = []
    make: list[Command] = []
    python: list[Block] = []
    for path in DOCS:
        blocks, prose = split_markdown(path)
        for b in blocks:
            if b.lang in SHELL_LANGS:
                c, m = _shell_commands(path, b.line, b.text, {})
                cli += c
                make += m
            elif b.lang in ("python", "py"):
                python.append(b)
        for n, line in prose:  # inline code spans that are commands
            for m in INLINE_CODE.finditer(line):
                span = m.group(2).strip()
                words = span.split()
                if not words:
                    continue
                if words[0] == "make":
                    make += _shell_commands(path, n, span, {})[1]
                elif words[0] in ("clipdistill", ".venv/bin/clipdistill") and len(words) > 1 and \
                        not words[1].isupper():  # `clipdistill VERB --help` names no verb
                    found = _shell_commands(path, n, span, {})[0]
                    cli += [dataclasses.replace(c, name_only=len(c.argv) == 1 and not c.argv[0].startswith("-"))
                            for c in found]
    return cli, make, python


CLI, MAKE, PYTHON = collect()


def _parse(argv: list[str]) -> str:
    """'' when argv parses with the real parser, else argparse's message."""
    args = [a for a in argv if a not in ("-h", "--help")]  # help exits before parsing the rest
    err = io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            if not args or args[0].startswith("-"):
                _top_parser().parse_args(args)
                return ""
            if args[0] not in VERBS:
                return f"unknown verb {args[0]!r}; valid: {', '.join(VERBS)}"
            parser = build_parser(args[0])
            parser.allow_abbrev = False  # `--epoch` must not stand for `--epochs`: the docs spell flags out
            parser.parse_args(args[1:])
    except SystemExit as e:
        return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {e.code}"
    return ""


def test_the_docs_show_commands_to_check():
    """The extraction itself works: the README's and the docs' main commands are found."""
    shown = {" ".join(c.argv[:1]) for c in CLI}
    for verb in ("make-pool", "fit-prompts", "predict", "check-bundle", "reproduce", "train", "export",
                 "compress", "embed"):
        assert verb in shown, f"no `clipdistill {verb}` command found in README.md or docs/"
    assert {"demo", "test", "install"} <= {w for c in MAKE for w in c.argv}
    assert any(c.where.startswith("docs/scaling.md") and c.argv[0] == "embed" for c in CLI), "torchrun -m missed"
    assert PYTHON, "no python block found"


@pytest.mark.parametrize("cmd", CLI, ids=[c.where for c in CLI])
def test_every_clipdistill_command_parses(cmd):
    if cmd.name_only:
        assert cmd.argv[0] in VERBS, f"{cmd.where}: `clipdistill {cmd.argv[0]}`: no such verb ({', '.join(VERBS)})"
        return
    problem = _parse(cmd.argv)
    assert not problem, f"{cmd.where}: `clipdistill {' '.join(cmd.argv)}`: {problem}"


def test_a_renamed_flag_fails_the_check():
    """The check has teeth: a flag that does not exist, or an abbreviation of one, is refused."""
    assert _parse(["fit-prompts", "--prompts", "p.txt", "--epochs", "40"]) == ""
    assert "--epoch-count" in _parse(["fit-prompts", "--epoch-count", "40"])
    assert _parse(["fit-prompts", "--epoch", "40"])  # abbreviations are off
    assert _parse(["predict", "--reject", "auto", "--model", "m.onnx", "a.jpg"]) == ""
    assert "invalid choice" in _parse(["train", "--augment", "crops"])
    assert "unknown verb" in _parse(["fit-prompt", "--epochs", "40"])


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return {t for line in text.splitlines() if (m := re.match(r"^([A-Za-z0-9_.\- ]+):(?!=)", line))
            for t in m.group(1).split()}


@pytest.mark.parametrize("cmd", MAKE, ids=[c.where for c in MAKE])
def test_every_make_target_exists(cmd):
    targets = [w for w in cmd.argv if "=" not in w and not w.startswith("-")]
    missing = [t for t in targets if t not in _make_targets()]
    assert not missing, f"{cmd.where}: `make {' '.join(cmd.argv)}`: no target {missing} in the Makefile"


@pytest.mark.parametrize("block", PYTHON, ids=[f"{_rel(b.path)}:{b.line}" for b in PYTHON])
def test_python_examples_import_what_exists_and_pass_real_fields(block):
    where = f"{_rel(block.path)}:{block.line}"
    tree = ast.parse(block.text)  # a syntax error fails here
    names: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "clipdistill":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{where}: {node.module} has no {alias.name}"
                names[alias.asname or alias.name] = getattr(module, alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            cls = names.get(node.func.id)
            if isinstance(cls, type) and dataclasses.is_dataclass(cls):
                fields = {f.name for f in dataclasses.fields(cls)}
                unknown = [k.arg for k in node.keywords if k.arg and k.arg not in fields]
                assert not unknown, f"{where}: {node.func.id} has no field {unknown}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in split_markdown(path)[1]:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = _slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def _links() -> list[tuple[str, Path, str]]:
    out = []
    for path in DOCS:
        for n, line in split_markdown(path)[1]:
            for m in LINK.finditer(INLINE_CODE.sub("", line)):
                target = m.group(1)
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                    continue
                out.append((f"{_rel(path)}:{n}", path, target))
    return out


LINKS = _links()


@pytest.mark.parametrize("where,path,target", LINKS, ids=[f"{w} {t}" for w, _, t in LINKS])
def test_every_relative_link_resolves(where, path, target):
    file, _, anchor = target.partition("#")
    dest = (path.parent / file).resolve() if file else path
    if dest == SEARCH_PAGE and not dest.exists():
        pytest.skip("docs/search.md is not written yet: test_the_search_page_exists fails until it is")
    assert dest.exists(), f"{where}: {target} -> {dest} does not exist"
    if anchor and dest.suffix == ".md":
        assert anchor in _anchors(dest), f"{where}: {target}: no heading #{anchor} in {_rel(dest)}"


def test_the_make_pool_hint_is_the_command_the_docs_show(tmp_path, monkeypatch, capsys):
    """`make-pool` ends with `next: clipdistill fit-prompts ...`; the docs show that command, run
    from where make-pool ran (a tiny pool, written into a temporary folder)."""
    from clipdistill.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["make-pool", "--out", "my-pool", "--images", "10", "--duplicates", "0", "--broken", "0",
                 "--test-per-class", "1", "-q"]) == 0
    hint = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("next: "))
    command = hint.removeprefix("next: ")
    assert hint in (ROOT / "docs" / "own-classifier.md").read_text(encoding="utf-8")
    for path in (ROOT / "README.md", ROOT / "docs" / "own-classifier.md"):  # as printed, or with flags added
        assert any(c.where.startswith(_rel(path)) and "clipdistill " + " ".join(c.argv) == command for c in CLI) or \
            any(c.where.startswith(_rel(path)) and ("clipdistill " + " ".join(c.argv)).startswith(command + " ")
                for c in CLI), f"{_rel(path)} does not show make-pool's next command: {command}"


def test_the_search_page_exists():
    """docs/search.md belongs to `clipdistill search`'s owner; the own-classifier job links to it."""
    assert SEARCH_PAGE.is_file(), "docs/search.md is missing: README.md and docs/own-classifier.md link to it"
