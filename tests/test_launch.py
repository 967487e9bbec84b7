"""The launch command yarnkit builds (`yarnkit.launch`): a free rendezvous port unless the user set MASTER_PORT.

A real 2-process launch while port 29500 is held is tests/test_distributed.py's DDP test.

Run: python -m pytest tests/test_launch.py -q   (< 1 s)
"""

from __future__ import annotations

import socket

import pytest

from yarnkit.errors import BadValue
from yarnkit.launch import accelerate_launch, free_port, main_process_port
from yarnkit.recipe_files import accelerate_config


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("", port))  # raises if something held it
    assert 1024 <= port < 65536


def test_launch_command_names_config_processes_and_a_free_port(monkeypatch):
    monkeypatch.delenv("MASTER_PORT", raising=False)
    command = accelerate_launch("zero2", 2)
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    assert command[command.index("--config_file") + 1] == str(accelerate_config("zero2"))
    assert command[command.index("--num_processes") + 1] == "2"
    port = int(command[command.index("--main_process_port") + 1])
    assert port != 29500 and 1024 <= port < 65536
    assert "--config_file" not in accelerate_launch()  # flags only for what was asked


def test_master_port_set_by_the_user_wins(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29612")
    assert main_process_port() == 29612
    command = accelerate_launch("single")
    assert command[command.index("--main_process_port") + 1] == "29612"


@pytest.mark.parametrize("value", ["http", "0", "70000"])
def test_a_bad_master_port_is_one_clear_error(monkeypatch, value):
    monkeypatch.setenv("MASTER_PORT", value)
    with pytest.raises(BadValue, match=f"MASTER_PORT={value!r} is not a TCP port"):
        main_process_port()
