// SPDX-License-Identifier: GPL-2.0-only
/*
 * mfc_example: a guest driver that allocates like the 2010 patch set's Aquila MFC driver.
 *
 * On load it registers the platform device "s3c-mfc5" and asks the CMA API (cma_guest,
 * served by the host's framework) for its firmware from kind "f" and two buffers from "a"
 * and "b", which the board's map places in mfc_fw, mfc_b1 and mfc_b2. Each chunk is mapped
 * write-combine with memremap() and filled with word[i] = pattern + i. The addresses and
 * patterns are read-only module parameters (/sys/module/mfc_example/parameters/) and a dmesg
 * line, so a test can check them from the host. Unloading frees the chunks; with leak=1 it
 * does not, and cma_guest frees them for it.
 */
#include <linux/io.h>
#include <linux/module.h>
#include <linux/platform_device.h>

#include <cma-kernel.h>

struct mfc_buf {
	const char *kind;
	size_t size;
	dma_addr_t alignment;
	u32 pattern;
	dma_addr_t addr;
};

static struct mfc_buf bufs[] = {
	{ "f", SZ_512K, SZ_128K, 0xf1f10000 },
	{ "a", SZ_4M, 0, 0xaaaa0000 },
	{ "b", SZ_2M, 0, 0xbbbb0000 },
};

static unsigned long long fw_addr, a_addr, b_addr;
module_param(fw_addr, ullong, 0444);
MODULE_PARM_DESC(fw_addr, "physical address of the firmware chunk (kind f)");
module_param(a_addr, ullong, 0444);
MODULE_PARM_DESC(a_addr, "physical address of the buffer of kind a");
module_param(b_addr, ullong, 0444);
MODULE_PARM_DESC(b_addr, "physical address of the buffer of kind b");

static bool leak;
module_param(leak, bool, 0444);
MODULE_PARM_DESC(leak, "leave the chunks allocated at unload (cma_guest frees them)");

static struct platform_device *pdev;

static int fill(struct mfc_buf *b)
{
	u32 *words = memremap(b->addr, b->size, MEMREMAP_WC);
	size_t i;

	if (!words)
		return -ENOMEM;
	for (i = 0; i < b->size / 4; i++)
		words[i] = b->pattern + (u32)i;
	memunmap(words);
	return 0;
}

static void free_all(void)
{
	size_t i;

	for (i = 0; i < ARRAY_SIZE(bufs); i++)
		if (bufs[i].addr)
			cma_free(bufs[i].addr);
}

static int __init mfc_example_init(void)
{
	size_t i;
	int ret;

	pdev = platform_device_register_simple("s3c-mfc5", -1, NULL, 0);
	if (IS_ERR(pdev))
		return PTR_ERR(pdev);
	for (i = 0; i < ARRAY_SIZE(bufs); i++) {
		struct mfc_buf *b = &bufs[i];
		dma_addr_t addr = cma_alloc(&pdev->dev, b->kind, b->size, b->alignment);

		if (CMA_IS_ERR_VALUE(addr)) {
			ret = (int)addr;
			pr_err("mfc_example: cma_alloc(%s, %s, %zu): %d\n", dev_name(&pdev->dev),
			       b->kind, b->size, ret);
			goto fail;
		}
		b->addr = addr;
		ret = fill(b);
		if (ret)
			goto fail;
		pr_info("mfc_example: %s/%s %pad size 0x%zx pattern 0x%08x\n", dev_name(&pdev->dev),
			b->kind, &b->addr, b->size, b->pattern);
	}
	fw_addr = bufs[0].addr;
	a_addr = bufs[1].addr;
	b_addr = bufs[2].addr;
	return 0;
fail:
	free_all();
	platform_device_unregister(pdev);
	return ret;
}

static void __exit mfc_example_exit(void)
{
	if (!leak)
		free_all();
	platform_device_unregister(pdev);
}

module_init(mfc_example_init);
module_exit(mfc_example_exit);
MODULE_DESCRIPTION("An MFC-like guest driver on the 2010 CMA API (cma-qemu example)");
MODULE_LICENSE("GPL");
