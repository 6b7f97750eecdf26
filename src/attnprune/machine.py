"""What a run's numbers were measured on: the machine (processor, cores, threads, vector
instructions, device) and the code (attnprune's version and git commit).

Seconds are only comparable on one machine: two machines with the same core count can differ
by more than a factor of two on the same repair. Every report that states seconds records
this beside them. A method's choice depends on the code that ran it, so every report and
comparison also records the commit (when attnprune runs from a git checkout).
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def processor_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_machine(device: str = "cpu") -> dict:
    """Processor, cores, torch threads, the CPU kernels torch uses (e.g. AVX2, AVX512) and the device."""
    out = {"processor": processor_name(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "cpu_kernels": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__, "device": device}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def machine_line(machine: dict) -> str:
    """One line for a report: ``AMD EPYC, 2 CPUs (torch 2 threads, AVX2)``, and the GPU when there is one."""
    if not machine:
        return "not recorded"
    if "note" in machine:
        return machine["note"]
    text = (f"{machine.get('processor', '?')}, {machine.get('cpus', '?')} CPUs (torch {machine.get('torch_threads', '?')} "
            f"threads, {machine.get('cpu_kernels', '?')})")
    return text + (f", {machine['gpu']}" if machine.get("gpu") else "")


def _git(here: Path, *args: str) -> str | None:
    """One git command's output in ``here``, or None (no git, not a checkout, or it failed)."""
    try:
        done = subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version(package: Path | None = None) -> dict:
    """attnprune's version and, when it runs from a git checkout, the commit and whether its code differs from it.

    Only a checkout whose ``src/attnprune`` is the package (``package``, default the one running)
    counts, so a copy installed into a virtual environment that happens to sit inside some
    repository names no commit.
    """
    from attnprune import __version__

    out: dict = {"attnprune": __version__}
    here = (package or Path(__file__).parent).resolve()
    top = _git(here, "rev-parse", "--show-toplevel")
    if top is None or (Path(top) / "src" / "attnprune").resolve() != here:
        return out
    commit = _git(here, "rev-parse", "--short=7", "HEAD")
    changes = _git(here, "status", "--porcelain", "--untracked-files=no", "--", str(here))
    if commit:
        out["commit"] = commit
        out["modified"] = bool(changes)
    return out


def code_line(code: dict) -> str:
    """One line for a report: ``attnprune 0.1.0 at commit 7b65035`` (and whether its code had uncommitted changes)."""
    if not code:
        return "not recorded"
    if "note" in code:
        return code["note"]
    text = f"attnprune {code.get('attnprune', '?')}"
    if code.get("commit"):
        text += f" at commit {code['commit']}" + (" with uncommitted changes to its code" if code.get("modified") else "")
    return text
