"""What a run's seconds were measured on: processor, cores, threads, vector instructions, device.

Seconds are only comparable on one machine: two machines with the same core count can differ
by more than a factor of two on the same repair. Every report that states seconds records
this beside them.
"""

from __future__ import annotations

import os
import platform
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
