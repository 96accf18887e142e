"""The agent's QEMU side: one QMP connection per VM and one module per channel kind.

    monitor       VMMonitor: QMP connection, reconnects, events, fd passing
    vms           VMRegistry / VM: VMs from the configuration and a socket directory
    chardev       finding front ends in QOM, taking chardevs over
    console       managed serial consoles (ring buffer, log, many viewers, one writer)
    guestchannel  virtio-serial ports (take over or hotplug, one client each)
    vnc           one QEMU VNC connection per stream
    provider      QemuProvider: OpenRequest -> Channel, and describe() for `vproxy ls`

Import the submodules you need: this package imports nothing by itself (qemu.qmp
costs start-up time on paths that do not talk to QEMU).
"""
