"""docs/errors.md's table of bad inputs stays true: every row's message is real and its named test checks it.

Each row reads | bad input | `fragment` ... | `tests/<path>.py::<test>` |. A row holds when
1. the fragment appears verbatim in the code (stages/, tuneline/, flows/, their subpackages included), so the
   message exists, and
2. the named test exists and one of its string literals (in its body, its parametrize cases, or a module-level
   table it reads) contains the fragment, or is a phrase of MIN_PHRASE+ characters found inside it: the test
   asserts on the message itself, not only on the file or key the message names.
Regex escapes are dropped and the prefixes every message shares ("params.yaml: ", "error: ") are ignored,
so that they cannot make an unrelated test match.
"""

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

PROJECT = next(path for path in Path(__file__).resolve().parents if (path / "pyproject.toml").is_file())
TABLE = PROJECT / "docs" / "errors.md"
SECTION = "# Bad inputs and their messages"
CODE_DIRS = ("stages", "tuneline", "flows")
MIN_PHRASE = 8  # with a space: a piece of a sentence, not a name such as 'download' or 'params.yaml'
SHARED_PREFIXES = ("params.yaml: ", "error: ")


@dataclass(frozen=True)
class Row:
    bad_input: str
    fragment: str
    test_file: Path
    test_name: str

    def __str__(self) -> str:
        return f"row '{self.bad_input}' ({self.test_file.name}::{self.test_name})"


def read_table(document: Path) -> list[Row]:
    """The rows of the table under SECTION, up to the next heading."""
    text = document.read_text()
    assert SECTION in text, f"{document.name} has no '{SECTION}' section"
    body = text.split(SECTION, 1)[1].split("\n#", 1)[0]
    rows = []
    for line in body.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 3 or set(cells[1]) <= set("-") or cells[0] == "Bad input":
            continue
        fragment = re.search(r"`([^`]+)`", cells[1])
        test = re.fullmatch(r"`(tests/[\w/]+\.py)::(\w+)`", cells[2])
        assert fragment and test, f"malformed table line in {document.name}: {line}"
        rows.append(Row(cells[0], fragment[1], PROJECT / test[1], test[2]))
    return rows


def code_text() -> str:
    """All of the code that can raise a user-facing error, as one text to search."""
    return "\n".join(path.read_text() for folder in CODE_DIRS for path in sorted((PROJECT / folder).rglob("*.py")))


def literals_of(test_file: Path, name: str) -> list[str]:
    """String literals of every function `name` in the file: body (docstring left out), decorators, and the
    module-level constants it reads (a parametrize table such as BAD_ROWS)."""
    module = ast.parse(test_file.read_text())
    constants = {target.id: node for node in module.body if isinstance(node, ast.Assign)
                 for target in node.targets if isinstance(target, ast.Name)}
    literals = []
    for function in ast.walk(module):
        if not isinstance(function, ast.FunctionDef) or function.name != name:
            continue
        body = function.body[1:] if ast.get_docstring(function) else function.body
        read = {node.id for part in body for node in ast.walk(part) if isinstance(node, ast.Name)}
        nodes = [*body, *function.decorator_list, *(constants[constant] for constant in read & constants.keys())]
        literals += [node.value for part in nodes for node in ast.walk(part)
                     if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    return literals


def without_shared_parts(text: str) -> str:
    text = text.replace("\\", "")  # a regex given to pytest.raises(match=...)
    for prefix in SHARED_PREFIXES:
        text = text.replace(prefix, "")
    return text.strip()


def asserts_on(literal: str, fragment: str) -> bool:
    """Whether a test's string literal checks the fragment: holds all of it, or a phrase from inside it."""
    literal, fragment = without_shared_parts(literal), without_shared_parts(fragment)
    return fragment in literal or (len(literal) >= MIN_PHRASE and " " in literal and literal in fragment)


ROWS = read_table(TABLE)
CODE = code_text()


def test_the_table_covers_the_bad_inputs() -> None:
    assert len(ROWS) >= 20, f"{TABLE.name}'s '{SECTION}' table has {len(ROWS)} rows; it should list every bad input"


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_row_quotes_a_real_message_that_its_test_asserts(row: Row) -> None:
    assert len(row.fragment) >= MIN_PHRASE, f"{row}: fragment `{row.fragment}` is too short to grep"
    assert row.fragment in CODE, f"{row}: `{row.fragment}` appears nowhere in {', '.join(CODE_DIRS)}/"
    assert row.test_file.is_file(), f"{row}: {row.test_file} does not exist"
    assert f"def {row.test_name}(" in row.test_file.read_text(), f"{row}: no def {row.test_name}( in it"
    literals = literals_of(row.test_file, row.test_name)
    assert any(asserts_on(literal, row.fragment) for literal in literals), (
        f"{row}: none of the test's {len(literals)} string literals holds `{row.fragment}` or a phrase of it; "
        f"name the test that checks this message, or quote the part of it that the test checks"
    )
