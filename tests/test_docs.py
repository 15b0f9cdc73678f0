"""The documentation stays true to the repository: README.md is a front page (at most 200 lines)
whose test command is the one CI runs; every relative link in README.md and docs/*.md resolves;
every repository path, ``kvray`` subcommand, ``python -m kvray...`` module and
``python benchmarks/<x>.py`` script the docs name exists. Read from the files, no imports of the
engine (this runs in a second)."""
import re
from pathlib import Path

import pytest

from kvray.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 200
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}

FENCE = re.compile(r"^(?P<indent> *)(?P<tick>```+|~~~+)(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)(?P=tick)[ \t]*$",
                   re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(?P<code>.+?)\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\((?P<target><[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\)")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s+(?P<target>\S+)", re.M)
REPO_PATH = re.compile(r"(?<![\w./~-])(?P<path>(?:kvray|benchmarks|cluster-configs|tests|docs)/[\w./-]*)")
BENCH_SCRIPT = re.compile(r"\bpython3?\s+(?P<path>benchmarks/[\w/.-]+\.py)\b")
PY_MODULE = re.compile(r"\bpython3?\s+-m\s+(?P<mod>kvray(?:\.\w+)*)")
ENV_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def split_code(text: str) -> tuple[str, list[tuple[str, str]], list[str]]:
    """(prose without code, [(fence language, fence body)], [inline code spans])."""
    fences = [(m["lang"].lower(), m["body"]) for m in FENCE.finditer(text)]
    prose = FENCE.sub("", text)
    spans = [m["code"] for m in INLINE_CODE.finditer(prose)]
    return INLINE_CODE.sub("", prose), fences, spans


def shell_commands(text: str) -> list[list[str]]:
    """Each simple command (as words) of the shell code: shell fences, and inline code spans."""
    _, fences, spans = split_code(text)
    lines = [ln for lang, body in fences if lang in SHELL_LANGS for ln in body.replace("\\\n", " ").splitlines()]
    lines += spans
    out = []
    for line in lines:
        line = re.sub(r"(^|\s)#.*$", "", line)  # a comment
        for part in re.split(r"&&|\|\||[;|&]", line):
            words = part.split()
            while words and ENV_ASSIGN.match(words[0]):
                words.pop(0)
            if words:
                out.append(words)
    return out


def links(text: str) -> list[str]:
    prose, _, _ = split_code(text)
    targets = [m["target"].strip("<>") for m in LINK.finditer(prose)]
    return targets + [m["target"] for m in REF_LINK.finditer(prose)]


# ---- the parsers themselves -----------------------------------------------------------------------

SAMPLE = """Intro [a](docs/x.md), [b](https://e.org/y), [c](#top), ![img](pics/p.png "t").

```bash
FOO=1 kvray check-config a.yaml && kvray nope   # comment: kvray hidden
python benchmarks/serving.py --x \\
    --y
```

```python
kvray_thing = d[0](1)   # not shell, not a link
```

Inline `kvray presets` and `[not](a-link.md)` and `python -m kvray.platform.autoscaling F`.
[ref]: docs/ref.md
"""


def test_the_parsers_find_what_they_should():
    assert links(SAMPLE) == ["docs/x.md", "https://e.org/y", "#top", "pics/p.png", "docs/ref.md"]
    cmds = shell_commands(SAMPLE)
    assert ["kvray", "check-config", "a.yaml"] in cmds and ["kvray", "nope"] in cmds
    assert ["kvray", "presets"] in cmds
    assert not any(c[:2] == ["kvray", "hidden"] for c in cmds)
    assert not any(w.startswith("kvray_thing") for c in cmds for w in c)
    assert [m["path"] for m in BENCH_SCRIPT.finditer(SAMPLE)] == ["benchmarks/serving.py"]
    assert [m["mod"] for m in PY_MODULE.finditer(SAMPLE)] == ["kvray.platform.autoscaling"]
    paths = [m["path"] for m in REPO_PATH.finditer("see `kvray/replica/`, ~/.cache/kvray/presets and /x/docs/y")]
    assert paths == ["kvray/replica/"]


# ---- the checks -------------------------------------------------------------------------------------

def test_readme_is_a_front_page():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move the detail into docs/"


def test_readme_test_command_is_what_ci_runs():
    """The README's test command installs what .ci/run installs (the same torch pin and the test
    extra) and runs the same pytest."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    pin = re.search(r"pip install -q (torch==\S+)", ci)
    assert pin, ".ci/run no longer pins torch: update this test and the README together"
    assert "pip install -q -e '.[test]'" in ci and "python -m pytest -q -x" in ci
    expected = f"pip install {pin[1]} && pip install -e '.[test]' && python -m pytest -q -x"
    assert expected in README.read_text(encoding="utf-8"), f"README.md should give CI's test command: {expected}"


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_relative_links_resolve(doc):
    bad = []
    for target in links(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):  # a URL, mailto:, an anchor
            continue
        path = target.split("#", 1)[0]
        if not (doc.parent / path).exists():
            bad.append(target)
    assert not bad, f"{rel(doc)} links to missing files: {bad}"


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_named_repository_paths_exist(doc):
    text = doc.read_text(encoding="utf-8")
    bad = sorted({m["path"] for m in REPO_PATH.finditer(text) if not (ROOT / m["path"].rstrip(".")).exists()})
    assert not bad, f"{rel(doc)} names paths that do not exist: {bad}"


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_kvray_subcommands_exist(doc):
    known = {name for name, *_ in COMMANDS} | {"-h", "--help"}
    bad = sorted({" ".join(c[:2]) for c in shell_commands(doc.read_text(encoding="utf-8"))
                  if c[0] == "kvray" and len(c) > 1 and c[1] not in known})  # a lone `kvray` is the name
    assert not bad, f"{rel(doc)} names kvray subcommands that do not exist: {bad} (known: {sorted(known)})"


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_benchmark_scripts_and_modules_exist(doc):
    text = doc.read_text(encoding="utf-8")
    bad = [m["path"] for m in BENCH_SCRIPT.finditer(text) if not (ROOT / m["path"]).is_file()]
    for m in PY_MODULE.finditer(text):
        base = ROOT / Path(*m["mod"].split("."))
        if not (base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()):
            bad.append(f"python -m {m['mod']}")
    assert not bad, f"{rel(doc)} runs scripts or modules that do not exist: {bad}"
