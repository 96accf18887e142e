"""`vproxy demo` (the README's first command) and `vproxy completion`, run as a user runs them.

What the demo tests prove: with QEMU and cryptography present it completes in seconds,
shows the console working both ways through the TLS tunnel, saves a real, non-blank
PNG of the VM's screen (taken through the tunnel), and leaves nothing behind (its
temporary directory is gone, its QEMU has exited), also when stopped by SIGINT or
SIGTERM; when QEMU or cryptography is missing it says so in one line, without a
traceback.

The completion tests prove that the printed scripts are click's, and that the bash one,
loaded into a real bash, completes vproxy's commands.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.agenttools import ENV, ROOT

VPROXY = [sys.executable, "-m", "vproxy"]


def _check_cleaned_up(stdout: str) -> None:
    workdir = re.search(r"^vproxy demo: .* in (\S+)$", stdout, re.M).group(1)
    pid = int(re.search(r"qemu-system-x86_64 pid (\d+)", stdout).group(1))
    assert not os.path.exists(workdir), "the demo left %s behind" % workdir
    assert re.search(r"cleaned up: agent stopped, VM killed, %s removed" % re.escape(workdir), stdout)
    deadline = time.monotonic() + 5
    while True:  # QEMU gone (or at most a zombie that init is about to reap)
        try:
            state = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state == "Z" or time.monotonic() > deadline:
            assert state == "Z", "QEMU %d still runs (state %s)" % (pid, state)
            return
        time.sleep(0.1)


@pytest.mark.qemu
@pytest.mark.slow
def test_demo_shows_console_and_screen_through_the_tunnel_and_cleans_up(tmp_path):
    from PIL import Image

    t0 = time.monotonic()
    out = subprocess.run(VPROXY + ["demo"], cwd=str(tmp_path), env=ENV, capture_output=True,
                         text=True, timeout=180)
    took = time.monotonic() - t0
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    for line in (r"  pki +a throwaway CA",
                 r"  vm +qemu-system-x86_64 pid \d+ \(TCG, 32 MiB\)",
                 r"  agent +vproxy serve on 127\.0\.0\.1:\d+: mutual TLS",
                 r"  connect +TLSv1\.3 as 'demo' to agent 'localhost'",
                 r"  console +attached to console serial0 of VM demo as its writer",
                 r" +you typed: +hello from vproxy$",
                 r" +guest echo: +HELLO FROM VPROXY$",
                 r"  replay +a second, read-only viewer",
                 r"  vnc +screenshot 720x400 through the tunnel .* saved to %s"
                 % re.escape(str(tmp_path / "vproxy-demo.png")),
                 r"  ls +demo +running +console serial0 attached +vnc available",
                 r"  audit +identity=demo vm=demo channel=console mode=rw"):
        assert re.search(line, text, re.M), "no line like %r in:\n%s" % (line, text)
    assert "Traceback" not in out.stderr, out.stderr
    _check_cleaned_up(text)
    print("vproxy demo took %.1f s" % took)

    image = Image.open(tmp_path / "vproxy-demo.png")  # the default: ./vproxy-demo.png
    assert image.format == "PNG" and image.size == (720, 400) and image.mode == "RGB"
    colours = dict((c, n) for n, c in image.getcolors())
    assert len(colours) >= 2, "a blank screen"
    background = max(colours, key=colours.get)
    assert background[2] > 0x80 and background[0] == background[1] == 0  # white on blue
    # the guest's echo is on screen row 2 (16-pixel rows): "HELLO FROM VPROXY" in white
    assert (0xFF, 0xFF, 0xFF) in [c for _, c in image.crop((0, 32, 17 * 9, 48)).getcolors()]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.qemu
@pytest.mark.slow
def test_demo_keep_running_is_cleaned_up_by_a_signal(tmp_path, sig):
    shot = tmp_path / "shot.png"
    proc = subprocess.Popen(VPROXY + ["demo", "--keep-running", "--screenshot", str(shot)],
                            cwd=str(tmp_path), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 120
        while not any("until you press Ctrl-C" in line for line in lines):
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, "".join(lines) + proc.stderr.read()
            lines.append(line)
        address = re.search(r"vproxy serve on (\S+):", "".join(lines)).group(1)
        # meanwhile the agent is there for the CLI, with the options printed
        ls_line = proc.stdout.readline()
        lines.append(ls_line)
        args = ls_line.split()
        assert args[:3] == ["vproxy", "ls", address]
        ls = subprocess.run(VPROXY + args[1:] + ["--json"], env=ENV, capture_output=True,
                            text=True, timeout=60)
        assert ls.returncode == 0, ls.stderr
        assert '"vm": "demo"' in ls.stdout
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines) + rest + err
    assert "Traceback" not in err, err
    _check_cleaned_up("".join(lines) + rest)
    assert shot.exists()


def test_demo_says_in_one_line_when_qemu_is_missing(tmp_path):
    out = subprocess.run(VPROXY + ["demo", "--qemu", str(tmp_path / "no-such-qemu")],
                         env=ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("vproxy: error: vproxy demo needs QEMU")
    assert "install the package qemu-system-x86" in out.stderr
    # the same with no QEMU on PATH at all
    env = dict(ENV, PATH=str(tmp_path))
    out = subprocess.run(VPROXY + ["demo"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "qemu-system-x86_64 was not found: install the package qemu-system-x86" in out.stderr
    assert not list(Path(tmp_path).glob("vproxy-demo*"))


def test_demo_says_in_one_line_when_cryptography_is_missing():
    code = ("import sys; sys.modules['cryptography'] = None; sys.argv = ['vproxy', 'demo']; "
            "from vproxy.cli import entry; entry()")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1, out.stderr
    assert "needs the Python package cryptography" in out.stderr and "pip install cryptography" in out.stderr


# --------------------------------------------------------------------------- completion


@pytest.mark.parametrize("shell,marker", [("bash", "complete -o nosort -F _vproxy_completion vproxy"),
                                          ("zsh", "compdef _vproxy_completion vproxy"),
                                          ("fish", "complete --no-files --command vproxy")])
def test_completion_prints_clicks_script(shell, marker):
    out = subprocess.run(VPROXY + ["completion", shell], env=ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert marker in out.stdout
    assert "_VPROXY_COMPLETE" in out.stdout


def test_completion_answers_for_commands_and_options():
    def complete(words, cword):
        env = dict(ENV, _VPROXY_COMPLETE="bash_complete", COMP_WORDS=words, COMP_CWORD=str(cword))
        out = subprocess.run(VPROXY, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert "plain,demo" in complete("vproxy de", 1)
    assert "plain,completion" in complete("vproxy com", 1)
    assert "plain,--keep-running" in complete("vproxy demo --ke", 2)
    assert set(complete("vproxy completion ", 2)) >= {"plain,bash", "plain,zsh", "plain,fish"}


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_the_bash_script_completes_in_a_real_bash(tmp_path):
    wrapper = tmp_path / "vproxy"  # `vproxy` on PATH, as after pip install or copying the pyz
    wrapper.write_text("#!/bin/sh\nexec %s -m vproxy \"$@\"\n" % sys.executable)
    wrapper.chmod(0o755)
    # bash calls the function with: the command, the word being completed, the word before
    script = ('eval "$(vproxy completion bash)"\n'
              'COMP_WORDS=(vproxy dem); COMP_CWORD=1; _vproxy_completion vproxy dem vproxy\n'
              'echo "got: ${COMPREPLY[*]}"\n')
    env = dict(ENV, PATH="%s:%s" % (tmp_path, os.environ.get("PATH", "")), PYTHONPATH=ROOT)
    out = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], env=env,
                         capture_output=True, text=True, timeout=60)
    assert "got: demo" in out.stdout, out.stdout + out.stderr
