"""The README's quick start stays true: its commands are what CI runs, and its Python example runs."""

import re

from conftest import REPO

README = (REPO / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    quick = README.split("## Quick start", 1)[1]
    blocks = re.findall(r"```(\w*)\n(.*?)```", quick, flags=re.S)
    run_cmd, test_cmd = blocks[0][1].strip(), blocks[1][1].strip()
    assert "\n" not in run_cmd and run_cmd.endswith("unitscope run")
    assert "\n" not in test_cmd and "pytest" in test_cmd
    ci = (REPO / ".ci" / "run").read_text()
    assert test_cmd in ci


def test_python_example_runs(tmp_path, monkeypatch):
    (example,) = _blocks("python")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    assert scope["codes"].shape[-1] == 512
    assert int((scope["codes"] > 0).sum(-1).max()) <= 16
    assert (tmp_path / "runs" / "example" / "sae" / "cfg.json").is_file()
