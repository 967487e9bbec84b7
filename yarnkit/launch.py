"""The `accelerate launch` command line yarnkit starts (e2e, the benchmark, tests), with a rendezvous port that is free.

    accelerate_launch("zero2", processes=2)
    # [python, -m, accelerate.commands.launch, --config_file .../zero2.yaml, --num_processes, 2,
    #  --main_process_port, 41234]

torchrun's default port, 29500, is one per machine: two launches at once, or one beside any other program that
holds it, fail with EADDRINUSE. So every launch yarnkit makes takes a port the OS reports free at that moment
(`free_port`), unless the user chose one: `MASTER_PORT` in the environment wins (`main_process_port`). A port is
free when it is picked and taken by the launcher a moment later; another program could take it in between, which
is far less likely than two programs both wanting 29500.
"""

from __future__ import annotations

import os
import socket
import sys

from yarnkit.errors import BadValue
from yarnkit.recipe_files import accelerate_config


def free_port() -> int:
    """A TCP port that nothing on this machine holds now (the OS picks it from its ephemeral range)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def main_process_port() -> int:
    """`$MASTER_PORT` when the user set it, else a free port."""
    chosen = os.environ.get("MASTER_PORT", "").strip()
    if not chosen:
        return free_port()
    if not chosen.isdigit() or not 0 < int(chosen) < 65536:
        raise BadValue(f"MASTER_PORT={chosen!r} is not a TCP port",
                       "set it to 1..65535, or unset it to pick a free one")
    return int(chosen)


def accelerate_launch(config: str | None = None, processes: int | None = None) -> list[str]:
    """`python -m accelerate.commands.launch [--config_file CONFIG] [--num_processes N] --main_process_port PORT`:
    CONFIG is a shipped launcher config (single, ddp, zero2, zero3, zero3_offload); append the script and its
    arguments (or other launcher flags first)."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if config:
        command += ["--config_file", str(accelerate_config(config))]
    if processes:
        command += ["--num_processes", str(processes)]
    return command + ["--main_process_port", str(main_process_port())]
