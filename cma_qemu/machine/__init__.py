"""The QEMU side: launch, device tree, QMP session, guest memory, console, guest images."""
