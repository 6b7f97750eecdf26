"""What a run records of the code that ran it (``attnprune.machine.code_version``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from attnprune import __version__
from attnprune.machine import code_line, code_version

GIT = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def _git(repo: Path, *args: str) -> str:
    import os

    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT}).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_a_checkout_names_its_commit_and_says_when_the_code_differs_from_it(tmp_path):
    package = tmp_path / "repo" / "src" / "attnprune"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("x = 1\n")
    (tmp_path / "repo" / "README.md").write_text("r\n")
    _git(tmp_path / "repo", "init", "-q")
    _git(tmp_path / "repo", "add", ".")
    _git(tmp_path / "repo", "commit", "-q", "-m", "c")
    head = _git(tmp_path / "repo", "rev-parse", "--short=7", "HEAD")
    assert code_version(package) == {"attnprune": __version__, "commit": head, "modified": False}
    (tmp_path / "repo" / "README.md").write_text("only prose changed\n")
    assert code_version(package)["modified"] is False  # what runs is unchanged
    (package / "__init__.py").write_text("x = 2\n")
    assert code_version(package)["modified"] is True
    assert code_line(code_version(package)) == f"attnprune {__version__} at commit {head} with uncommitted changes to its code"
    # a package that is not the checkout's src/attnprune (an installed copy inside some repository) names no commit
    elsewhere = tmp_path / "repo" / "venv" / "site-packages" / "attnprune"
    elsewhere.mkdir(parents=True)
    assert code_version(elsewhere) == {"attnprune": __version__}
    assert code_version(tmp_path) == {"attnprune": __version__}  # not a checkout at all
    assert code_line({}) == "not recorded" and code_line({"attnprune": "0.1.0"}) == "attnprune 0.1.0"


def test_the_running_package_names_this_checkouts_commit_when_it_is_one():
    package = Path(__import__("attnprune").__file__).resolve().parent
    top = subprocess.run(["git", "-C", str(package), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    code = code_version()
    if shutil.which("git") and top.returncode == 0 and (Path(top.stdout.strip()) / "src" / "attnprune").resolve() == package:
        head = subprocess.run(["git", "-C", str(package), "rev-parse", "--short=7", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        assert code["commit"] == head and isinstance(code["modified"], bool)
    else:
        assert code == {"attnprune": __version__}
