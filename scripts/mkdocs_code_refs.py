"""MkDocs hook: a docs page that names a repository file in backticks must name one that exists.

`mkdocs build --strict` fails on any warning, so a page that still says `tinkerd/old_name.py`
after a rename, or `tests/test_x.py::test_gone` after a test is deleted, fails CI instead of
misleading a reader. Checked inside inline code and fenced blocks:

- `tinkerd/...`, `tests/...`, `bench/...`, `examples/...`, `scripts/...`, `docs/...`,
  `.ci/...`: a name with an extension must be a file, one ending in `/` a directory (a name
  with neither, such as the model `tinkerd/tiny`, is not a path and is left alone);
- a `::name` after a Python file: the file defines `name` (a function or class);
- a relative module path such as `api/tinker.py` or `cluster/scheduler.py`: a file under the
  repository root or under `tinkerd/`;
- a bare `name.py` or `name.sh`: a file of that name somewhere in the repository's code.

README.md is not a page of the site but points into it: its code references are checked the
same way, and each of its relative links must name a file.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.plugins import get_plugin_logger
from mkdocs.structure.files import Files
from mkdocs.structure.pages import Page

log = get_plugin_logger("code_refs")

TOP_DIRS = ("tinkerd", "tests", "bench", "examples", "scripts", "docs", ".ci")
CODE_DIRS = ("tinkerd", "tests", "bench", "examples", "scripts")
# A fenced block (``` to ```), else an inline span of one or two backticks.
CODE = re.compile(r"^```[^\n]*\n(.*?)^```|``(.+?)``|`([^`\n]+)`", re.S | re.M)
# Not preceded by a character that would make the match the tail of a longer name or an
# absolute path (`/data/models/tiny`, `<data-dir>/runs`, `tinker://...`).
EDGE = r"(?<![\w./:<>@$~-])"
REPO_PATH = re.compile(EDGE + r"((?:" + "|".join(map(re.escape, TOP_DIRS)) + r")/[\w./-]*)(::\w+)?")
MODULE_PATH = re.compile(EDGE + r"((?:[\w-]+/)+[\w-]+\.py)\b")
BARE_FILE = re.compile(EDGE + r"([\w-]+\.(?:py|sh))(?![\w/.-])")
# A relative link target in Markdown: `](docs/serving.md)`, `](docs/sdk.md#losses)`.
LINK = re.compile(r"\]\((?![a-z]+:|#)([^)#\s]+)")


@cache
def code_file_names(root: Path) -> frozenset[str]:
    """Names of the files under the code directories and at the root (for bare `name.py`)."""
    names = {p.name for p in root.iterdir() if p.is_file()}
    for top in CODE_DIRS:
        names.update(p.name for p in (root / top).rglob("*") if p.is_file())
    return frozenset(names)


def broken_refs(markdown: str, root: Path) -> list[str]:
    """Every repository reference in `markdown`'s code that names nothing there, with why."""
    problems: list[str] = []
    for match in CODE.finditer(markdown):
        code = next(group for group in match.groups() if group is not None)
        problems.extend(_check_code(code, root))
    return problems


def _check_code(code: str, root: Path) -> list[str]:
    problems: list[str] = []
    spans: list[tuple[int, int]] = []
    for m in REPO_PATH.finditer(code):
        spans.append(m.span())
        path, symbol = m.group(1).rstrip("."), m.group(2)
        target = root / path
        if path.endswith("/"):
            if not target.is_dir():
                problems.append(f"`{path}`: no such directory")
        elif re.search(r"\.\w+$", Path(path).name):
            if not target.is_file():
                problems.append(f"`{path}`: no such file")
            elif symbol and not re.search(
                rf"^\s*(?:async\s+def|def|class)\s+{symbol[2:]}\b", target.read_text(), re.M
            ):
                problems.append(f"`{path}{symbol}`: {path} defines no {symbol[2:]}")
    for m in MODULE_PATH.finditer(code):
        if any(start <= m.start() < end for start, end in spans):
            continue
        path = m.group(1)
        if not ((root / path).is_file() or (root / "tinkerd" / path).is_file()):
            problems.append(f"`{path}`: no such file here or under tinkerd/")
    for m in BARE_FILE.finditer(code):
        if m.group(1) not in code_file_names(root):
            problems.append(f"`{m.group(1)}`: no file of that name in the repository")
    return problems


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Warn (an error under --strict) for each reference to a repository file that is gone."""
    root = Path(config.config_file_path).resolve().parent
    for problem in broken_refs(markdown, root):
        log.warning(f"{page.file.src_uri}: {problem}")
    return markdown


def on_post_build(config: MkDocsConfig) -> None:
    """README.md: its code references and its links into docs/ (a warning each, as for pages)."""
    root = Path(config.config_file_path).resolve().parent
    readme = (root / "README.md").read_text()
    problems = broken_refs(readme, root)
    for target in LINK.findall(readme):
        if not (root / target).exists():
            problems.append(f"link to {target}: no such file")
    for problem in problems:
        log.warning(f"README.md: {problem}")
