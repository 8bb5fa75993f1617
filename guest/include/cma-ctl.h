/* SPDX-License-Identifier: GPL-2.0-only WITH Linux-syscall-note */
/*
 * /dev/cma-ctl: how the cma_guest module meets the guest daemon (`cma-test -k`) that holds
 * the channel to the agent. The daemon read()s one struct cma_ctl_request at a time (blocking
 * until a caller asks), sends it to the agent as the matching JSON command and write()s one
 * struct cma_ctl_reply with the same seq. Only one daemon may hold the device (EBUSY);
 * when it closes, every waiting caller gets ENODEV.
 */
#ifndef CMA_CTL_H
#define CMA_CTL_H

#include <linux/types.h>

enum cma_ctl_op {
	CMA_CTL_ALLOC = 1,      /* cma-alloc: dev, kind, size, alignment -> addr, size */
	CMA_CTL_ALLOC_FROM,     /* cma-alloc-from: regions ("" = the asterisk), size, alignment */
	CMA_CTL_FREE,           /* cma-free: addr */
	CMA_CTL_GET,            /* cma-get: addr */
	CMA_CTL_PUT,            /* cma-put: addr -> count = 1 when freed */
	CMA_CTL_INFO,           /* cma-info: dev, kind -> the info fields */
	CMA_CTL_INFO_ABOUT,     /* cma-info-about: regions */
};

#define CMA_CTL_NAME_SIZE 64
#define CMA_CTL_REGIONS_SIZE 256

struct cma_ctl_request {
	__u32 seq;
	__u32 op;
	__u64 size;
	__u64 alignment;
	__u64 addr;
	char dev[CMA_CTL_NAME_SIZE];
	char kind[CMA_CTL_NAME_SIZE];
	char regions[CMA_CTL_REGIONS_SIZE];
};

struct cma_ctl_reply {
	__u32 seq;
	__s32 error;            /* 0, or the agent's error class as a negative errno */
	__u64 addr;
	__u64 size;
	__u64 lower_bound;
	__u64 upper_bound;
	__u64 total_size;
	__u64 free_size;
	__u64 count;
};

#endif
