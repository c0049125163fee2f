"""The README's usage snippet runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_snippets_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python snippet"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_readme_quick_start_is_two_commands_that_exist():
    text = README.read_text()
    quick = re.search(r"## Quick start\n\n```bash\n(.*?)```", text, flags=re.S).group(1)
    commands = [line.split("#")[0].split() for line in quick.strip().splitlines()]
    assert len(commands) == 2
    for command in commands:
        assert command[0] == "bash" and (README.parent / command[1]).is_file()
