from vproxy.cli import entry

entry()
