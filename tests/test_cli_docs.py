"""--help and man/vproxy.1 agree: every option of every command is in the page."""

import os
import re

import click

from vproxy.cli import main

PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "man", "vproxy.1")


def commands(group, prefix=()):
    for name, command in group.commands.items():
        yield prefix + (name,), command
        if isinstance(command, click.Group):
            yield from commands(command, prefix + (name,))


def test_every_command_and_option_is_in_the_man_page():
    page = open(PAGE).read()
    documented = set(re.findall(r"Fl -?([a-z][a-z-]*)", page))
    missing = []
    for path, command in commands(main):
        if not re.search(r"Cm %s\b" % re.escape(path[-1]), page):
            missing.append(" ".join(path))
        for param in command.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("-") and opt.lstrip("-") not in documented and opt != "-h":
                    missing.append("%s %s" % (" ".join(path), opt))
    assert not missing, "not in man/vproxy.1: %s" % ", ".join(missing)


def test_user_errors_are_one_line_without_a_traceback():
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "vproxy", "bench", "localhost:1", "--cert", "/nonexistent.pem",
                          "--key", "/nonexistent.key", "--ca", "/nonexistent-ca.pem"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=root))
    assert out.returncode == 2
    assert out.stderr.startswith("vproxy: error: ") and "Traceback" not in out.stderr
    assert "/nonexistent" in out.stderr


def test_every_config_key_is_in_vproxy_conf_5():
    from vproxy.agent.config import KEYS

    page = open(os.path.join(os.path.dirname(PAGE), "vproxy.conf.5")).read()
    documented = set(re.findall(r"Cm \[*([a-z_]+)", page)) | set(re.findall(r"\b([a-z_]+) =", page))
    for line in re.findall(r"^\.It Cm (.*?) No", page, re.M):
        documented |= {k.strip() for k in line.split(",")}
    assert set(KEYS) <= documented, set(KEYS) - documented
