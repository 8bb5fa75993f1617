/* SPDX-License-Identifier: GPL-2.0-only WITH Linux-syscall-note */
/*
 * The user-space ABI of /dev/cma (the cma_guest module, guest/kernel/cma_guest.c): the 2010
 * patch set's test device. Open /dev/cma, ask for one chunk with IOCTL_CMA_ALLOC, mmap it
 * (write-combine), close the descriptor to free it.
 */
#ifndef CMA_DEV_H
#define CMA_DEV_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define CMA_MAGIC (('c' << 24) | ('M' << 16) | ('a' << 8) | 0x42)

/* dev and kind: at most 16 characters, NUL-terminated within their 17 bytes */
#define CMA_NAME_SIZE 17

/*
 * 64 bytes with the same layout on every architecture: the 64-bit members start at byte 40.
 * size and alignment in: alignment 0 is a page; start out: the chunk's physical address.
 */
struct cma_alloc_request {
	__u32 magic;               /* CMA_MAGIC, or the ioctl fails with ENOTTY */
	char  name[CMA_NAME_SIZE]; /* the device name the map is matched against */
	char  kind[CMA_NAME_SIZE]; /* the kind ("" matches DEV and DEV/ entries) */
	__u16 pad;
	__u64 size;
	__u64 alignment;
	__u64 start;
};

#define IOCTL_CMA_ALLOC _IOWR('p', 0, struct cma_alloc_request)

#endif
