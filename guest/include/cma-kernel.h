/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * The 2010 patch set's in-kernel CMA API, exported by the cma_guest module and served by the
 * host agent's framework (through the guest daemon, `cma-test -k`). Allocation returns a
 * physical address, or a negative errno to be tested with IS_ERR_VALUE() of the value cast
 * to unsigned long (dma_addr_t is 64-bit on Debian's 32-bit ARM kernels, and 6.1's
 * IS_ERR_VALUE casts through a pointer: CMA_IS_ERR_VALUE() does both). Every call sleeps
 * (one round trip to the agent, about a millisecond) and fails with -ENODEV when no daemon
 * holds /dev/cma-ctl, or -ETIMEDOUT after CMA_GUEST_TIMEOUT_S seconds without a reply.
 * Chunks a module still holds when it is unloaded are freed.
 */
#ifndef CMA_KERNEL_H
#define CMA_KERNEL_H

#include <linux/device.h>
#include <linux/err.h>
#include <linux/types.h>

#define CMA_GUEST_TIMEOUT_S 15

/* Whether a dma_addr_t from cma_alloc() or cma_alloc_from() is a negative errno. */
#define CMA_IS_ERR_VALUE(addr) IS_ERR_VALUE((unsigned long)(addr))

struct cma_info {
	dma_addr_t lower_bound;   /* the lowest address of the regions */
	dma_addr_t upper_bound;   /* one past the highest */
	size_t total_size;
	size_t free_size;
	unsigned count;           /* the number of regions */
};

dma_addr_t __must_check cma_alloc(const struct device *dev, const char *kind,
				  size_t size, dma_addr_t alignment);
dma_addr_t __must_check cma_alloc_from(const char *regions, size_t size,
				       dma_addr_t alignment);
int cma_free(dma_addr_t addr);
int cma_get(dma_addr_t addr);
int cma_put(dma_addr_t addr);   /* 1: freed (last reference), 0: still held */
int __must_check cma_info(struct cma_info *info, const struct device *dev, const char *kind);
int __must_check cma_info_about(struct cma_info *info, const char *regions);

#endif
