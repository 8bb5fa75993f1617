// SPDX-License-Identifier: GPL-2.0-only
/*
 * cma_guest: the 2010 CMA patch set's /dev/cma test device and in-kernel API inside a
 * cma-qemu guest, served by the host agent's framework.
 *
 * Every request (an ioctl on /dev/cma, a cma_alloc() from a driver) is queued; the guest
 * daemon (`cma-test -k`) holds /dev/cma-ctl, reads the queue, asks the agent over the board's
 * channel and writes the reply back. Without a daemon a request fails at once with ENODEV;
 * a daemon that stops answering costs a caller at most CMA_GUEST_TIMEOUT_S seconds.
 */
#include <linux/completion.h>
#include <linux/fs.h>
#include <linux/io.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/of.h>
#include <linux/of_address.h>
#include <linux/poll.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/wait.h>

#include <cma-ctl.h>
#include <cma-dev.h>
#include <cma-kernel.h>

/* ------------------------------------------------------------------ the request queue */

struct cma_call {
	struct list_head node;      /* on pending (not read yet) or sent; empty when answered */
	struct cma_ctl_request req;
	struct cma_ctl_reply rep;
	struct completion done;
};

static DEFINE_MUTEX(queue_lock);    /* pending, sent, daemon, next_seq */
static LIST_HEAD(pending);
static LIST_HEAD(sent);
static DECLARE_WAIT_QUEUE_HEAD(daemon_wq);
static bool daemon;
static u32 next_seq = 1;

/* Ends a call with an error; queue_lock held. */
static void call_fail(struct cma_call *c, int error)
{
	list_del_init(&c->node);
	c->rep.error = error;
	complete(&c->done);
}

/* Queues a request and waits for its reply: 0 or a negative errno in c->rep.error. */
static int call(struct cma_call *c)
{
	long left;

	init_completion(&c->done);
	memset(&c->rep, 0, sizeof(c->rep));
	mutex_lock(&queue_lock);
	if (!daemon) {
		mutex_unlock(&queue_lock);
		return -ENODEV;
	}
	c->req.seq = next_seq++;
	list_add_tail(&c->node, &pending);
	mutex_unlock(&queue_lock);
	wake_up_interruptible(&daemon_wq);

	left = wait_for_completion_killable_timeout(&c->done, CMA_GUEST_TIMEOUT_S * HZ);
	mutex_lock(&queue_lock);
	if (!list_empty(&c->node)) {  /* still queued: we give up, the reply will be dropped */
		list_del_init(&c->node);
		mutex_unlock(&queue_lock);
		return left < 0 ? -EINTR : -ETIMEDOUT;
	}
	mutex_unlock(&queue_lock);   /* answered: completed under the lock, rep is final */
	return c->rep.error;
}

/* ------------------------------------------------------------------ /dev/cma-ctl */

static int ctl_open(struct inode *inode, struct file *file)
{
	int ret = 0;

	mutex_lock(&queue_lock);
	if (daemon)
		ret = -EBUSY;
	else
		daemon = true;
	mutex_unlock(&queue_lock);
	return ret ? ret : nonseekable_open(inode, file);
}

static int ctl_release(struct inode *inode, struct file *file)
{
	struct cma_call *c, *tmp;

	mutex_lock(&queue_lock);
	daemon = false;
	list_for_each_entry_safe(c, tmp, &pending, node)
		call_fail(c, -ENODEV);
	list_for_each_entry_safe(c, tmp, &sent, node)
		call_fail(c, -ENODEV);
	mutex_unlock(&queue_lock);
	return 0;
}

static ssize_t ctl_read(struct file *file, char __user *buf, size_t len, loff_t *pos)
{
	struct cma_ctl_request req;
	struct cma_call *c;
	int ret;

	if (len < sizeof(req))
		return -EINVAL;
	for (;;) {
		mutex_lock(&queue_lock);
		c = list_first_entry_or_null(&pending, struct cma_call, node);
		if (c) {
			req = c->req;
			list_move_tail(&c->node, &sent);
			mutex_unlock(&queue_lock);
			break;
		}
		mutex_unlock(&queue_lock);
		if (file->f_flags & O_NONBLOCK)
			return -EAGAIN;
		ret = wait_event_interruptible(daemon_wq, !list_empty(&pending));
		if (ret)
			return ret;
	}
	if (copy_to_user(buf, &req, sizeof(req)))
		return -EFAULT;   /* the caller times out; a daemon that faults is broken anyway */
	return sizeof(req);
}

static ssize_t ctl_write(struct file *file, const char __user *buf, size_t len, loff_t *pos)
{
	struct cma_ctl_reply rep;
	struct cma_call *c;

	if (len != sizeof(rep))
		return -EINVAL;
	if (copy_from_user(&rep, buf, sizeof(rep)))
		return -EFAULT;
	if (rep.error > 0 || rep.error < -MAX_ERRNO)
		return -EINVAL;
	mutex_lock(&queue_lock);
	list_for_each_entry(c, &sent, node) {
		if (c->req.seq == rep.seq) {
			c->rep = rep;
			list_del_init(&c->node);
			complete(&c->done);
			break;
		}
	}
	mutex_unlock(&queue_lock);
	return sizeof(rep);   /* a reply nobody waits for any more is dropped */
}

static __poll_t ctl_poll(struct file *file, struct poll_table_struct *wait)
{
	__poll_t mask = EPOLLOUT | EPOLLWRNORM;

	poll_wait(file, &daemon_wq, wait);
	mutex_lock(&queue_lock);
	if (!list_empty(&pending))
		mask |= EPOLLIN | EPOLLRDNORM;
	mutex_unlock(&queue_lock);
	return mask;
}

static const struct file_operations ctl_fops = {
	.owner = THIS_MODULE,
	.open = ctl_open,
	.release = ctl_release,
	.read = ctl_read,
	.write = ctl_write,
	.poll = ctl_poll,
	.llseek = no_llseek,
};

static struct miscdevice ctl_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "cma-ctl",
	.fops = &ctl_fops,
	.mode = 0600,
};

/* ------------------------------------------------------------------ calls by kind */

static int call_addr(u32 op, dma_addr_t addr, struct cma_call *c)
{
	memset(&c->req, 0, sizeof(c->req));
	c->req.op = op;
	c->req.addr = addr;
	return call(c);
}

static int copy_name(char *dst, size_t size, const char *src)
{
	if (!src)
		src = "";
	return strscpy(dst, src, size) < 0 ? -EINVAL : 0;
}

static int alloc_call(struct cma_call *c, const char *dev, const char *kind, u64 size,
		      u64 alignment)
{
	memset(&c->req, 0, sizeof(c->req));
	c->req.op = CMA_CTL_ALLOC;
	c->req.size = size;
	c->req.alignment = alignment;
	if (copy_name(c->req.dev, sizeof(c->req.dev), dev) ||
	    copy_name(c->req.kind, sizeof(c->req.kind), kind))
		return -EINVAL;
	return call(c);
}

/* ------------------------------------------------------------------ the in-kernel API */

/* A chunk allocated through the API, and the module whose code asked for it (or NULL). */
struct kchunk {
	struct list_head node;
	dma_addr_t addr;
	struct module *owner;
};

/*
 * The modules loaded since cma_guest (only they can call it), as the module notifier saw
 * them come and go. 6.1 exports no __module_address(), so a caller's module is the one
 * whose text holds the return address, checked at the call (init text is gone later).
 */
struct kmodule {
	struct list_head node;
	struct module *mod;
};

static DEFINE_MUTEX(kchunks_lock);   /* kchunks and kmodules */
static LIST_HEAD(kchunks);
static LIST_HEAD(kmodules);

static void kchunk_add(dma_addr_t addr, unsigned long caller)
{
	struct kchunk *k = kmalloc(sizeof(*k), GFP_KERNEL);
	struct kmodule *m;

	if (!k)
		return;   /* only the unload sweep misses it */
	k->addr = addr;
	k->owner = NULL;
	mutex_lock(&kchunks_lock);
	list_for_each_entry(m, &kmodules, node) {
		if (within_module(caller, m->mod)) {
			k->owner = m->mod;
			break;
		}
	}
	list_add(&k->node, &kchunks);
	mutex_unlock(&kchunks_lock);
}

static void kchunk_remove(dma_addr_t addr)
{
	struct kchunk *k;

	mutex_lock(&kchunks_lock);
	list_for_each_entry(k, &kchunks, node) {
		if (k->addr == addr) {
			list_del(&k->node);
			kfree(k);
			break;
		}
	}
	mutex_unlock(&kchunks_lock);
}

static dma_addr_t alloc_result(struct cma_call *c, int ret, unsigned long caller)
{
	if (ret)
		return (dma_addr_t)(long)ret;
	kchunk_add(c->rep.addr, caller);
	return c->rep.addr;
}

dma_addr_t cma_alloc(const struct device *dev, const char *kind, size_t size,
		     dma_addr_t alignment)
{
	struct cma_call c;
	int ret = alloc_call(&c, dev ? dev_name(dev) : "", kind, size, alignment);

	return alloc_result(&c, ret, _RET_IP_);
}
EXPORT_SYMBOL_GPL(cma_alloc);

dma_addr_t cma_alloc_from(const char *regions, size_t size, dma_addr_t alignment)
{
	struct cma_call c;
	int ret;

	memset(&c.req, 0, sizeof(c.req));
	c.req.op = CMA_CTL_ALLOC_FROM;
	c.req.size = size;
	c.req.alignment = alignment;
	ret = copy_name(c.req.regions, sizeof(c.req.regions), regions);
	if (!ret)
		ret = call(&c);
	return alloc_result(&c, ret, _RET_IP_);
}
EXPORT_SYMBOL_GPL(cma_alloc_from);

int cma_free(dma_addr_t addr)
{
	struct cma_call c;
	int ret = call_addr(CMA_CTL_FREE, addr, &c);

	if (!ret)
		kchunk_remove(addr);
	return ret;
}
EXPORT_SYMBOL_GPL(cma_free);

int cma_get(dma_addr_t addr)
{
	struct cma_call c;

	return call_addr(CMA_CTL_GET, addr, &c);
}
EXPORT_SYMBOL_GPL(cma_get);

int cma_put(dma_addr_t addr)
{
	struct cma_call c;
	int ret = call_addr(CMA_CTL_PUT, addr, &c);

	if (ret)
		return ret;
	if (c.rep.count)
		kchunk_remove(addr);
	return c.rep.count ? 1 : 0;
}
EXPORT_SYMBOL_GPL(cma_put);

static int info_result(struct cma_info *info, struct cma_call *c, int ret)
{
	if (ret)
		return ret;
	info->lower_bound = c->rep.lower_bound;
	info->upper_bound = c->rep.upper_bound;
	info->total_size = c->rep.total_size;
	info->free_size = c->rep.free_size;
	info->count = c->rep.count;
	return 0;
}

int cma_info(struct cma_info *info, const struct device *dev, const char *kind)
{
	struct cma_call c;
	int ret;

	memset(&c.req, 0, sizeof(c.req));
	c.req.op = CMA_CTL_INFO;
	ret = copy_name(c.req.dev, sizeof(c.req.dev), dev ? dev_name(dev) : "");
	if (!ret)
		ret = copy_name(c.req.kind, sizeof(c.req.kind), kind);
	if (!ret)
		ret = call(&c);
	return info_result(info, &c, ret);
}
EXPORT_SYMBOL_GPL(cma_info);

int cma_info_about(struct cma_info *info, const char *regions)
{
	struct cma_call c;
	int ret;

	memset(&c.req, 0, sizeof(c.req));
	c.req.op = CMA_CTL_INFO_ABOUT;
	ret = copy_name(c.req.regions, sizeof(c.req.regions), regions);
	if (!ret)
		ret = call(&c);
	return info_result(info, &c, ret);
}
EXPORT_SYMBOL_GPL(cma_info_about);

/* A module coming is remembered; one going gives back the chunks it did not free. */
static int module_event(struct notifier_block *nb, unsigned long state, void *data)
{
	struct module *mod = data;
	struct kchunk *k, *tmp;
	struct kmodule *m, *mtmp;
	LIST_HEAD(gone);

	if (state == MODULE_STATE_COMING) {
		m = kmalloc(sizeof(*m), GFP_KERNEL);
		if (m) {   /* without it, only this module's unload sweep is lost */
			m->mod = mod;
			mutex_lock(&kchunks_lock);
			list_add(&m->node, &kmodules);
			mutex_unlock(&kchunks_lock);
		}
		return NOTIFY_OK;
	}
	if (state != MODULE_STATE_GOING)
		return NOTIFY_DONE;
	mutex_lock(&kchunks_lock);
	list_for_each_entry_safe(m, mtmp, &kmodules, node) {
		if (m->mod == mod) {
			list_del(&m->node);
			kfree(m);
		}
	}
	list_for_each_entry_safe(k, tmp, &kchunks, node)
		if (k->owner == mod)
			list_move(&k->node, &gone);
	mutex_unlock(&kchunks_lock);
	list_for_each_entry_safe(k, tmp, &gone, node) {
		struct cma_call c;
		int ret = call_addr(CMA_CTL_FREE, k->addr, &c);

		pr_info("cma_guest: %s unloaded holding %pad: freed (%d)\n", mod->name, &k->addr,
			ret);
		list_del(&k->node);
		kfree(k);
	}
	return NOTIFY_OK;
}

static struct notifier_block module_nb = {
	.notifier_call = module_event,
};

/* ------------------------------------------------------------------ /dev/cma */

/* One chunk per open file, as in the 2010 test device. */
struct cma_file {
	struct mutex lock;
	bool allocated;
	u64 start;
	u64 size;      /* page-rounded, as the agent reports it */
};

static int dev_open(struct inode *inode, struct file *file)
{
	struct cma_file *f = kzalloc(sizeof(*f), GFP_KERNEL);

	if (!f)
		return -ENOMEM;
	mutex_init(&f->lock);
	file->private_data = f;
	return nonseekable_open(inode, file);
}

static int dev_release(struct inode *inode, struct file *file)
{
	struct cma_file *f = file->private_data;

	if (f->allocated) {
		struct cma_call c;
		int ret = call_addr(CMA_CTL_FREE, f->start, &c);

		if (ret)
			pr_warn("cma_guest: freeing 0x%llx on close: error %d\n", f->start, ret);
	}
	kfree(f);
	return 0;
}

static bool name_ok(const char *name)
{
	return memchr(name, '\0', CMA_NAME_SIZE) != NULL;
}

static long dev_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct cma_file *f = file->private_data;
	struct cma_alloc_request req;
	struct cma_call c;
	int ret;

	if (cmd != IOCTL_CMA_ALLOC)
		return -ENOTTY;
	if (copy_from_user(&req, (void __user *)arg, sizeof(req)))
		return -EFAULT;
	if (req.magic != CMA_MAGIC)
		return -ENOTTY;
	if (!name_ok(req.name) || !name_ok(req.kind))
		return -EINVAL;
	mutex_lock(&f->lock);
	if (f->allocated) {
		ret = -EBADFD;
		goto out;
	}
	ret = alloc_call(&c, req.name, req.kind, req.size, req.alignment);
	if (ret)
		goto out;
	req.start = c.rep.addr;
	if (copy_to_user((void __user *)arg, &req, sizeof(req))) {
		call_addr(CMA_CTL_FREE, c.rep.addr, &c);
		ret = -EFAULT;
		goto out;
	}
	f->allocated = true;
	f->start = req.start;
	f->size = PAGE_ALIGN(c.rep.size ? c.rep.size : req.size);
out:
	mutex_unlock(&f->lock);
	return ret;
}

/* Whether [start, start + size) lies inside one /reserved-memory node. */
static bool reserved(u64 start, u64 size)
{
	struct device_node *parent = of_find_node_by_path("/reserved-memory");
	struct device_node *child;
	bool inside = false;

	if (!parent)
		return false;
	for_each_child_of_node(parent, child) {
		struct resource res;

		if (of_address_to_resource(child, 0, &res))
			continue;
		if (start >= res.start && size <= resource_size(&res) &&
		    start - res.start <= resource_size(&res) - size) {
			inside = true;
			of_node_put(child);
			break;
		}
	}
	of_node_put(parent);
	return inside;
}

static int dev_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct cma_file *f = file->private_data;
	u64 offset = (u64)vma->vm_pgoff << PAGE_SHIFT;
	u64 len = vma->vm_end - vma->vm_start;
	int ret;

	mutex_lock(&f->lock);
	if (!f->allocated) {
		ret = -EBADFD;
		goto out;
	}
	if (offset > f->size || len > f->size - offset) {
		ret = -ENOSPC;
		goto out;
	}
	if (!reserved(f->start + offset, len)) {
		ret = -EPERM;
		goto out;
	}
	/* no-map memory is mapped write-combine, as the kernel maps a no-map shared-dma-pool */
	vma->vm_page_prot = pgprot_writecombine(vma->vm_page_prot);
	vma->vm_flags |= VM_IO | VM_PFNMAP | VM_DONTEXPAND | VM_DONTDUMP;
	ret = remap_pfn_range(vma, vma->vm_start, PHYS_PFN(f->start + offset), len,
			      vma->vm_page_prot);
out:
	mutex_unlock(&f->lock);
	return ret;
}

static const struct file_operations dev_fops = {
	.owner = THIS_MODULE,
	.open = dev_open,
	.release = dev_release,
	.unlocked_ioctl = dev_ioctl,
	.compat_ioctl = dev_ioctl,
	.mmap = dev_mmap,
	.llseek = no_llseek,
};

static struct miscdevice dev_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "cma",
	.fops = &dev_fops,
	.mode = 0666,
};

/* ------------------------------------------------------------------ module */

static int __init cma_guest_init(void)
{
	int ret = misc_register(&ctl_misc);

	if (ret)
		return ret;
	ret = misc_register(&dev_misc);
	if (ret) {
		misc_deregister(&ctl_misc);
		return ret;
	}
	ret = register_module_notifier(&module_nb);
	if (ret) {
		misc_deregister(&dev_misc);
		misc_deregister(&ctl_misc);
	}
	return ret;
}

static void __exit cma_guest_exit(void)
{
	struct kchunk *k, *tmp;
	struct kmodule *m, *mtmp;

	unregister_module_notifier(&module_nb);
	misc_deregister(&dev_misc);
	misc_deregister(&ctl_misc);
	list_for_each_entry_safe(k, tmp, &kchunks, node) {  /* our own callers are gone */
		list_del(&k->node);
		kfree(k);
	}
	list_for_each_entry_safe(m, mtmp, &kmodules, node) {
		list_del(&m->node);
		kfree(m);
	}
}

module_init(cma_guest_init);
module_exit(cma_guest_exit);
MODULE_DESCRIPTION("The 2010 CMA /dev/cma device and in-kernel API, served by the cma-qemu agent");
MODULE_LICENSE("GPL");
