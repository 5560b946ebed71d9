"""The README's Python code blocks run as written (issue 19).

Every ```python block of README.md runs, in order, in one namespace (later blocks use the names of earlier
ones, as a reader typing them into one session would), in a temporary folder. A block that needs what a
test machine does not have is marked in the README, on the line before its fence::

    <!-- readme-test: skip (why) -->

and is listed here by its reason. The only change made before running is ``SMALLER``: prompt counts cut so
the blocks run in a minute on a CPU (the code is the README's, the numbers it prints are not its figures).
"""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
MARK = re.compile(r"<!--\s*readme-test:\s*skip\s*\((.+?)\)\s*-->")
# (README text, what the test runs instead): fewer prompts, fewer resamples; nothing else
SMALLER = [
    ("family.sample(n_per_task=100, shots=4, seed=0)", "family.sample(n_per_task=12, shots=4, seed=0)"),
    ("sample(50, shots=4, seed=1)", "sample(12, shots=4, seed=1)"),
    ("family.sample(30, shots=0)", "family.sample(6, shots=0)"),
    ("null=1000", "null=50"),
    ('tvlens.emergence("default")', 'tvlens.emergence("default", n_per_task=12, steps=tvlens.checkpoint_steps("default")[::12])'),
    ("n_boot=5000", "n_boot=200"),
]


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line, code, skip reason or None)`` of every ```python block."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            j = start
            while lines[j].strip() != "```":
                j += 1
            prev = lines[i - 1] if i else ""
            m = MARK.search(prev)
            out.append((start + 1, "\n".join(lines[start:j]), m.group(1) if m else None))
            i = j
        i += 1
    return out


def test_every_block_is_found_and_every_skip_says_why():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 7
    skipped = [b for b in blocks if b[2]]
    assert all(len(reason) > 10 for _, _, reason in skipped)
    assert len(skipped) <= 4, "only blocks needing a large model or a training run may be skipped"
    text = README.read_text()
    for old, _ in SMALLER:
        assert old in text, f"SMALLER names README text that is gone: {old!r}"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TVLENS_KILL_TEST", "0")
    import tvlens  # noqa: F401  (the blocks import it themselves; this keeps the package loaded once)

    ns: dict = {"__name__": "__readme__"}
    mod = types.ModuleType("mytasks")  # the README's mytasks.py, importable as the README says
    ran = 0
    for line, code, skip in python_blocks(README.read_text()):
        if skip:
            continue
        for old, new in SMALLER:
            code = code.replace(old, new)
        if code.lstrip().startswith("# mytasks.py"):
            mod.__dict__["__name__"] = "mytasks"
            exec(compile(code, f"README.md:{line} (mytasks.py)", "exec"), mod.__dict__)
            monkeypatch.setitem(__import__("sys").modules, "mytasks", mod)
            continue
        try:
            exec(compile(code, f"README.md:{line}", "exec"), ns)
        except Exception as e:  # name the block, and the README line, that failed
            pytest.fail(f"README.md block at line {line} failed: {type(e).__name__}: {e}")
        ran += 1
    assert ran >= 4
    assert (tmp_path / "findings.html").exists()  # the views block saved its page
    fam = tvlens.tasks.get("cases")  # the README's own family registered and samples
    p = fam.sample(2, shots=4, seed=0)
    assert p.task_names == ["upper", "number"]
    words, q = p.str_tokens(0), int(p.query_pos[0])  # prompt 0 is an "upper" prompt: its answer is the capital
    assert words[q + 1] == words[q - 1].upper()
