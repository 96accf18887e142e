"""vproxy: a QEMU VM's consoles, guest channels and VNC over one mutual-TLS connection."""

__version__ = "0.1.0"
