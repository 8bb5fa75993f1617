/*
 * cma_dev_check: the /dev/cma ABI's error paths, checked from a guest process.
 *
 *   cma_dev_check errors DEV KIND      every error of the ABI; "ok NAME" or "FAIL NAME: why"
 *   cma_dev_check fill DEV KIND SIZE PATTERN
 *                                      alloc, mmap, word[i] = PATTERN + i, print "chunk
 *                                      0xSTART 0xSIZE", read it back, close (which frees it)
 *   cma_dev_check hold N DEV KIND SIZE allocate on N fds, print each "chunk ...", then sleep
 *                                      until killed (its chunks must be freed by the kill)
 *   cma_dev_check bench N DEV KIND SIZE
 *                                      N times open, ioctl, close; prints "ioctl: n=N p50=Xus
 *                                      p99=Yus" of the ioctl alone (as cma-test's bench times
 *                                      the alloc alone; the free on close is not timed)
 *
 * Exit status: 0 when every check passed. Built by the e2e tests with
 * arm-linux-gnueabihf-gcc -static -O2 -Wall -Wextra -Werror -I guest/include.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <cma-dev.h>

static int failures;

static void check(const char *name, int got, int want)
{
	if (got == want) {
		printf("ok %s\n", name);
	} else {
		printf("FAIL %s: got %s, want %s\n", name, got ? strerror(got) : "success",
		       want ? strerror(want) : "success");
		failures++;
	}
}

/* The errno of an ioctl, or 0 when it succeeded. */
static int alloc_errno(int fd, unsigned long cmd, struct cma_alloc_request *req)
{
	return ioctl(fd, cmd, req) ? errno : 0;
}

static void request(struct cma_alloc_request *req, const char *dev, const char *kind,
		    uint64_t size)
{
	memset(req, 0, sizeof(*req));
	req->magic = CMA_MAGIC;
	strncpy(req->name, dev, sizeof(req->name) - 1);
	strncpy(req->kind, kind, sizeof(req->kind) - 1);
	req->size = size;
}

static int open_cma(void)
{
	int fd = open("/dev/cma", O_RDWR | O_CLOEXEC);

	if (fd < 0) {
		perror("/dev/cma");
		exit(2);
	}
	return fd;
}

static int errors(const char *dev, const char *kind)
{
	struct cma_alloc_request req;
	long page = sysconf(_SC_PAGESIZE);
	int fd = open_cma();
	void *p;

	check("layout: sizeof 64", (int)sizeof(req), 64);
	check("layout: size at 40", (int)offsetof(struct cma_alloc_request, size), 40);
	check("layout: ioctl number", IOCTL_CMA_ALLOC == 0xC0407000u ? 0 : EINVAL, 0);

	p = mmap(NULL, (size_t)page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	check("mmap before alloc: EBADFD", p == MAP_FAILED ? errno : 0, EBADFD);

	request(&req, dev, kind, (uint64_t)page);
	check("wrong command: ENOTTY", alloc_errno(fd, _IOWR('p', 1, struct cma_alloc_request), &req),
	      ENOTTY);
	req.magic = CMA_MAGIC + 1;
	check("wrong magic: ENOTTY", alloc_errno(fd, IOCTL_CMA_ALLOC, &req), ENOTTY);

	request(&req, dev, kind, (uint64_t)page);
	memset(req.name, 'x', sizeof(req.name));
	check("name without NUL: EINVAL", alloc_errno(fd, IOCTL_CMA_ALLOC, &req), EINVAL);
	request(&req, dev, kind, (uint64_t)page);
	memset(req.kind, 'x', sizeof(req.kind));
	check("kind without NUL: EINVAL", alloc_errno(fd, IOCTL_CMA_ALLOC, &req), EINVAL);

	check("bad pointer: EFAULT",
	      ioctl(fd, IOCTL_CMA_ALLOC, (void *)16) ? errno : 0, EFAULT);

	request(&req, dev, kind, 1ull << 40);
	check("too big: ENOMEM (the framework's error)", alloc_errno(fd, IOCTL_CMA_ALLOC, &req),
	      ENOMEM);
	request(&req, dev, kind, (uint64_t)page);
	req.alignment = 3 * (uint64_t)page;
	check("alignment not a power of two: EINVAL", alloc_errno(fd, IOCTL_CMA_ALLOC, &req),
	      EINVAL);

	request(&req, dev, kind, (uint64_t)page + 1);
	check("alloc", alloc_errno(fd, IOCTL_CMA_ALLOC, &req), 0);
	printf("chunk 0x%" PRIx64 " 0x%" PRIx64 "\n", (uint64_t)req.start, (uint64_t)page + 1);
	check("second alloc on one fd: EBADFD", alloc_errno(fd, IOCTL_CMA_ALLOC, &req), EBADFD);

	p = mmap(NULL, 3 * (size_t)page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	check("mmap past the chunk: ENOSPC", p == MAP_FAILED ? errno : 0, ENOSPC);
	p = mmap(NULL, (size_t)page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 2 * page);
	check("mmap offset past the chunk: ENOSPC", p == MAP_FAILED ? errno : 0, ENOSPC);
	p = mmap(NULL, 2 * (size_t)page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	check("mmap of the page-rounded chunk", p == MAP_FAILED ? errno : 0, 0);
	if (p != MAP_FAILED)
		munmap(p, 2 * (size_t)page);
	p = mmap(NULL, (size_t)page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, page);
	check("mmap of its second page", p == MAP_FAILED ? errno : 0, 0);
	if (p != MAP_FAILED)
		munmap(p, (size_t)page);
	close(fd);
	printf("%s\n", failures ? "FAILED" : "PASSED");
	return failures ? 1 : 0;
}

static int fill(const char *dev, const char *kind, uint64_t size, uint32_t pattern)
{
	struct cma_alloc_request req;
	int fd = open_cma();
	volatile uint32_t *words;
	uint64_t i, n, bad = 0;
	size_t len;

	request(&req, dev, kind, size);
	if (ioctl(fd, IOCTL_CMA_ALLOC, &req)) {
		printf("FAIL alloc: %s\n", strerror(errno));
		return 1;
	}
	len = (size_t)((size + 4095) & ~4095ull);
	words = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (words == MAP_FAILED) {
		printf("FAIL mmap: %s\n", strerror(errno));
		return 1;
	}
	n = size / 4;
	for (i = 0; i < n; i++)
		words[i] = pattern + (uint32_t)i;
	for (i = 0; i < n; i++)
		bad += words[i] != pattern + (uint32_t)i;
	printf("chunk 0x%" PRIx64 " 0x%" PRIx64 "\n", (uint64_t)req.start, size);
	printf("%s\n", bad ? "FAILED readback" : "PASSED");
	munmap((void *)words, len);
	close(fd);
	return bad ? 1 : 0;
}

static int hold(int count, const char *dev, const char *kind, uint64_t size)
{
	struct cma_alloc_request req;
	int i;

	for (i = 0; i < count; i++) {
		int fd = open_cma();

		request(&req, dev, kind, size);
		if (ioctl(fd, IOCTL_CMA_ALLOC, &req)) {
			printf("FAIL alloc: %s\n", strerror(errno));
			return 1;
		}
		printf("chunk 0x%" PRIx64 " 0x%" PRIx64 "\n", (uint64_t)req.start, size);
	}
	printf("HOLDING\n");
	fflush(stdout);
	for (;;)
		pause();
}

static uint64_t now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static int bench(int count, const char *dev, const char *kind, uint64_t size)
{
	struct cma_alloc_request req;
	uint64_t *us = calloc((size_t)count, sizeof(*us));
	int i;

	if (!us || count < 1)
		return 2;
	for (i = 0; i < count; i++) {
		int fd = open_cma();
		uint64_t t0;

		request(&req, dev, kind, size);
		t0 = now_us();
		if (ioctl(fd, IOCTL_CMA_ALLOC, &req)) {
			printf("FAIL alloc: %s\n", strerror(errno));
			return 1;
		}
		us[i] = now_us() - t0;
		close(fd);
	}
	qsort(us, (size_t)count, sizeof(*us), cmp_u64);
	printf("ioctl: n=%d p50=%" PRIu64 "us p99=%" PRIu64 "us\n", count, us[count / 2],
	       us[(size_t)count * 99 / 100]);
	free(us);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 4 && !strcmp(argv[1], "errors"))
		return errors(argv[2], argv[3]);
	if (argc == 6 && !strcmp(argv[1], "fill"))
		return fill(argv[2], argv[3], strtoull(argv[4], NULL, 0),
			    (uint32_t)strtoul(argv[5], NULL, 0));
	if (argc == 6 && !strcmp(argv[1], "hold"))
		return hold(atoi(argv[2]), argv[3], argv[4], strtoull(argv[5], NULL, 0));
	if (argc == 6 && !strcmp(argv[1], "bench"))
		return bench(atoi(argv[2]), argv[3], argv[4], strtoull(argv[5], NULL, 0));
	fprintf(stderr, "usage: cma_dev_check errors DEV KIND | fill DEV KIND SIZE PATTERN | "
		"hold N DEV KIND SIZE | bench N DEV KIND SIZE\n");
	return 2;
}
