"""The README's two commands are the project's entry points: keep them and CI in step."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(python3 -m venv .*)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    commands = readme_commands()
    assert len(commands) == 2
    main, tests = commands
    assert tests.endswith("&& pytest")
    assert tests in (ROOT / ".ci" / "run").read_text()
    assert "evopress compress --preset cpu" in main
