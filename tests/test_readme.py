"""The README's quick start stays true: CI runs its test command verbatim, and its demo command names the demo."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r'^TEST_COMMAND="(.+)"$', ci, re.MULTILINE).group(1)
    readme = (ROOT / "README.md").read_text()
    assert command in readme
    assert 'eval "$TEST_COMMAND"' in ci


def test_readme_demo_command_runs_an_existing_demo():
    readme = (ROOT / "README.md").read_text()
    demo = re.search(r"^python3 -m venv .* && python (\S+)$", readme, re.MULTILINE).group(1)
    assert (ROOT / demo).is_file()
    assert "pip install torch==2.13.0" in readme
