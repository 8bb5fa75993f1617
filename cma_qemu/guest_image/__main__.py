"""``python -m cma_qemu.guest_image [FLAVOUR ...]``: build the guest images, print the paths."""

from cma_qemu.guest_image.build import main

raise SystemExit(main())
