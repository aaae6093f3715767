"""What both ends do to a VM: pausing, throttling, QMP and the QEMU device-state handoff."""
