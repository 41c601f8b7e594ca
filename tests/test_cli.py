"""The CLI as a whole: help and examples, start-up cost, the README and CI agreeing."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import typer
from typer.testing import CliRunner

from helpers import REPO
from poetgen.cli.app import app

runner = CliRunner()


def _commands() -> dict:
    return typer.main.get_command(app).commands


def test_every_command_has_help_with_an_example():
    commands = _commands()
    assert {"prepare", "train", "sample", "eval"} <= set(commands)
    for name in commands:
        r = runner.invoke(app, [name, "--help"])
        assert r.exit_code == 0, name
        assert "Example:" in r.output, f"`poetgen {name} --help` has no Example:"


# Flags the README documents outside their command's own section, each with the one section that does document it.
# Exact both ways: the flag must be in that section and must not be in its own (then this entry is stale: delete it).
DOCUMENTED_ELSEWHERE = {("train", "--nproc"): "Distributed training"}


def readme_sections() -> dict[str, str]:
    """README.md's `## ` sections by title; a command's section, titled `poetgen <cmd>` (and maybe more), by <cmd>."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    sections: dict[str, str] = {}
    for part in re.split(r"^## ", readme, flags=re.M)[1:]:
        title, body = part.split("\n", 1)
        m = re.match(r"`poetgen (\w+)`", title)
        sections[m.group(1) if m else title] = body
    return sections


def mentions(text: str, flag: str) -> bool:
    return re.search(re.escape(flag) + r"(?![\w-])", text) is not None  # --top must not match --top-k


def test_every_option_is_documented_in_its_command_s_readme_section():
    sections = readme_sections()
    commands = _commands()
    no_section = sorted(set(commands) - set(sections))
    assert not no_section, "commands without a README section titled `poetgen <cmd>`: " + ", ".join(no_section)
    options = {(name, opt) for name, command in commands.items() for param in command.params
               for opt in getattr(param, "opts", []) if opt.startswith("--") and opt != "--help"}
    missing = []
    for name, opt in sorted(options):
        where = DOCUMENTED_ELSEWHERE.get((name, opt), name)
        if not mentions(sections.get(where, ""), opt):
            missing.append(f"{name} {opt}" + (f" (expected in `## {where}`)" if where != name else ""))
    assert not missing, "options missing from their command's README section: " + ", ".join(missing)
    stale = sorted(f"{name} {opt}" for name, opt in DOCUMENTED_ELSEWHERE
                   if (name, opt) not in options or mentions(sections[name], opt))
    assert not stale, "delete from DOCUMENTED_ELSEWHERE (gone, or now in its own section): " + ", ".join(stale)


def test_help_does_not_import_torch():
    code = "import sys; from poetgen.cli.app import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    r = subprocess.run([sys.executable, "-m", "poetgen", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "prepare" in r.stdout


def test_version():
    from poetgen import __version__

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"poetgen {__version__}"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    blocks = readme.split("```bash\n")
    test_cmd = next(b.split("\n", 1)[0] for b in blocks[1:] if "pytest" in b.split("\n", 1)[0])
    assert test_cmd in ci.splitlines()


def test_openmp_threads_wait_passively_unless_the_user_says_otherwise():
    code = "import os; import poetgen.cli.app; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "ACTIVE"
