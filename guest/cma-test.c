/*
 * cma-test: the guest-side stub of cma-qemu.
 *
 * Reads commands from stdin, one per line, in the format of docs/line-format.md (the same
 * lines `cma-qemu replay` reads), asks the host agent for memory over the board's channel
 * (a virtio-serial port or a UART) with the line-delimited JSON guest protocol, and touches
 * chunk memory through /dev/mem. With -k it is the daemon of the cma_guest kernel module
 * instead: it holds the channel and serves /dev/cma-ctl (guest/include/cma-ctl.h).
 *
 * Build: arm-linux-gnueabihf-gcc -static -O2 -Wall -Wextra -Werror -o cma-test cma-test.c
 *
 * SPDX-License-Identifier: GPL-2.0-only
 */
#define _GNU_SOURCE
#define _FILE_OFFSET_BITS 64

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "include/cma-ctl.h"

#define MAX_LINE 1023          /* input line, without the new line */
#define MAX_NAME 16            /* dev and kind */
#define MAX_REPLY (64 * 1024)  /* protocol line */
#define MAX_TOKENS 8
#define MAX_FIELDS 16
#define MAX_COUNT 1000000u
#define REQ_SIZE 8192

/* ------------------------------------------------------------------ state */

/*
 * Live chunks, indexed by id: slot[id] for 1 <= id < next_fresh. A slot is live or its id
 * is in the min-heap of freed ids, so the lowest unused id is the heap's top, or next_fresh
 * when the heap is empty. Live slots are linked in allocation order (oldest .. newest), so
 * lookup and "the newest" are O(1), add and remove O(log n) (the heap), list O(n).
 */
struct chunk {
	int id;
	int live;
	int prev, next;  /* ids in allocation order; 0: none */
	uint64_t size;   /* as requested */
	uint64_t addr;   /* guest physical start */
};

static struct chunk *slot;     /* slot[0] unused */
static int *freed;             /* min-heap of freed ids, both arrays hold slot_cap entries */
static size_t slot_cap, nfreed;
static int next_fresh = 1, oldest, newest;

static const char *channel_path;
static int chan_fd = -1;
static int chan_synced;
static int timeout_ms = 10000;
static uint64_t next_req_id = 1;
/* The request envelope's "owner" member (docs/protocol.md): set under -k, else none. */
static const char *owner_member = "";

static char rbuf[MAX_REPLY + 1];
static size_t rlen;
static int rdiscard;           /* dropping an over-long line up to its new line */
/* Error lines printed: a script with any exits 1, as `cma-qemu replay` does. */
static unsigned long error_lines;

/* ------------------------------------------------------------------ output */

static void err(const char *cmd, const char *cls, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void err(const char *cmd, const char *cls, const char *fmt, ...)
{
	va_list ap;

	error_lines++;
	fflush(stdout);
	fprintf(stderr, "%s: %s: ", cmd, cls);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static void usage(FILE *f)
{
	fputs("usage: cma-test [-d DEVICE] [-t SECONDS] [-h] < SCRIPT\n"
	      "       cma-test -k [-d DEVICE] [-t SECONDS]\n"
	      "  -d DEVICE   the channel to the cma-qemu agent (default: $CMA_CHANNEL)\n"
	      "  -t SECONDS  how long to wait for each reply (default 10)\n"
	      "  -k          serve the cma_guest kernel module's requests (/dev/cma-ctl)\n"
	      "commands (one per line; an empty line repeats the previous one):\n"
	      "  a|alloc DEV[/KIND] SIZE[/ALIGN]      allocate; prints ID: 0xSIZE@0xSTART\n"
	      "  r|alloc-from REGIONS SIZE[/ALIGN]    allocate from a region list (or *)\n"
	      "  f|free [ID]                          free a chunk (default: the newest)\n"
	      "  l|list                               list live chunks\n"
	      "  i|info DEV[/KIND]                    region info for a device\n"
	      "  w|write ID PATTERN                   fill word[i] = PATTERN + i\n"
	      "  v|verify ID PATTERN                  check word[i] == PATTERN + i\n"
	      "  b|bench N DEV[/KIND] SIZE            time N alloc round trips (each freed)\n"
	      "  p|ping N                             time N empty round trips\n"
	      "  # comment\n", f);
}

/* ------------------------------------------------------------------ time */

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------ JSON reader */

enum jtype { J_NONE, J_NUM, J_STR, J_NULL, J_OTHER };

struct jfield {
	char key[32];
	enum jtype type;
	uint64_t num;
	char str[512];
};

enum rkind { R_NONE, R_RETURN, R_ERROR };

struct reply {
	int has_id;
	uint64_t id;
	enum rkind kind;
	enum jtype scalar_type;   /* "return": <scalar> (guest-sync) */
	uint64_t scalar;
	int nf;
	struct jfield f[MAX_FIELDS];   /* the "return" or "error" object */
};

static const char *ws(const char *p)
{
	while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')
		p++;
	return p;
}

static void put_utf8(char **o, char *end, unsigned cp)
{
	char tmp[4];
	int n, i;

	if (cp < 0x80) {
		tmp[0] = (char)cp;
		n = 1;
	} else if (cp < 0x800) {
		tmp[0] = (char)(0xc0 | (cp >> 6));
		tmp[1] = (char)(0x80 | (cp & 0x3f));
		n = 2;
	} else if (cp < 0x10000) {
		tmp[0] = (char)(0xe0 | (cp >> 12));
		tmp[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
		tmp[2] = (char)(0x80 | (cp & 0x3f));
		n = 3;
	} else {
		tmp[0] = (char)(0xf0 | (cp >> 18));
		tmp[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
		tmp[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
		tmp[3] = (char)(0x80 | (cp & 0x3f));
		n = 4;
	}
	for (i = 0; i < n && *o < end; i++)
		*(*o)++ = tmp[i];
}

static int hex4(const char *p, unsigned *v)
{
	unsigned r = 0;
	int i;

	for (i = 0; i < 4; i++) {
		char c = p[i];

		r <<= 4;
		if (c >= '0' && c <= '9')
			r |= (unsigned)(c - '0');
		else if (c >= 'a' && c <= 'f')
			r |= (unsigned)(c - 'a' + 10);
		else if (c >= 'A' && c <= 'F')
			r |= (unsigned)(c - 'A' + 10);
		else
			return -1;
	}
	*v = r;
	return 0;
}

/* Parses a string at p (on the opening quote); copies at most outsz-1 bytes. */
static const char *jstring(const char *p, char *out, size_t outsz)
{
	char *o = out, *end = out + (outsz ? outsz - 1 : 0);

	if (*p != '"')
		return NULL;
	p++;
	while (*p != '"') {
		unsigned cp, lo;

		if (*p == '\0')
			return NULL;
		if (*p != '\\') {
			if (o < end)
				*o++ = *p;
			p++;
			continue;
		}
		p++;
		switch (*p) {
		case '"': case '\\': case '/':
			cp = (unsigned char)*p; break;
		case 'b': cp = '\b'; break;
		case 'f': cp = '\f'; break;
		case 'n': cp = '\n'; break;
		case 'r': cp = '\r'; break;
		case 't': cp = '\t'; break;
		case 'u':
			if (hex4(p + 1, &cp))
				return NULL;
			p += 4;
			if (cp >= 0xd800 && cp < 0xdc00 && p[1] == '\\' && p[2] == 'u' &&
			    !hex4(p + 3, &lo) && lo >= 0xdc00 && lo < 0xe000) {
				cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
				p += 6;
			}
			break;
		default:
			return NULL;
		}
		put_utf8(&o, end, cp);
		p++;
	}
	if (outsz)
		*o = '\0';
	return p + 1;
}

/* Parses a number; sets *type to J_NUM for integers in 0..2^64-1, J_OTHER otherwise. */
static const char *jnumber(const char *p, enum jtype *type, uint64_t *v)
{
	const char *start = p;
	int neg = 0, frac = 0;
	char *end;

	if (*p == '-') {
		neg = 1;
		p++;
	}
	if (*p < '0' || *p > '9')
		return NULL;
	while (*p >= '0' && *p <= '9')
		p++;
	if (*p == '.') {
		frac = 1;
		p++;
		while (*p >= '0' && *p <= '9')
			p++;
	}
	if (*p == 'e' || *p == 'E') {
		frac = 1;
		p++;
		if (*p == '+' || *p == '-')
			p++;
		while (*p >= '0' && *p <= '9')
			p++;
	}
	*type = J_OTHER;
	if (!neg && !frac) {
		errno = 0;
		*v = strtoull(start, &end, 10);
		if (errno == 0 && end == p)
			*type = J_NUM;
	}
	return p;
}

static const char *jskip(const char *p, int depth);

static const char *jskip_container(const char *p, int depth, char close)
{
	p = ws(p + 1);
	if (*p == close)
		return p + 1;
	for (;;) {
		if (close == '}') {
			p = jstring(p, NULL, 0);
			if (!p)
				return NULL;
			p = ws(p);
			if (*p != ':')
				return NULL;
			p = ws(p + 1);
		}
		p = jskip(p, depth + 1);
		if (!p)
			return NULL;
		p = ws(p);
		if (*p == close)
			return p + 1;
		if (*p != ',')
			return NULL;
		p = ws(p + 1);
	}
}

static const char *jskip(const char *p, int depth)
{
	enum jtype t;
	uint64_t v;

	if (depth > 32)
		return NULL;
	p = ws(p);
	switch (*p) {
	case '"':
		return jstring(p, NULL, 0);
	case '{':
		return jskip_container(p, depth, '}');
	case '[':
		return jskip_container(p, depth, ']');
	case 't':
		return strncmp(p, "true", 4) ? NULL : p + 4;
	case 'f':
		return strncmp(p, "false", 5) ? NULL : p + 5;
	case 'n':
		return strncmp(p, "null", 4) ? NULL : p + 4;
	default:
		return jnumber(p, &t, &v);
	}
}

/* A flat object: scalar members are kept, nested values are skipped. */
static const char *jobject(const char *p, struct reply *r)
{
	p = ws(p);
	if (*p != '{')
		return NULL;
	p = ws(p + 1);
	if (*p == '}')
		return p + 1;
	for (;;) {
		struct jfield scratch, *f = r->nf < MAX_FIELDS ? &r->f[r->nf] : &scratch;

		memset(f, 0, sizeof(*f));
		p = jstring(p, f->key, sizeof(f->key));
		if (!p)
			return NULL;
		p = ws(p);
		if (*p != ':')
			return NULL;
		p = ws(p + 1);
		if (*p == '"') {
			f->type = J_STR;
			p = jstring(p, f->str, sizeof(f->str));
		} else if (*p == '-' || (*p >= '0' && *p <= '9')) {
			p = jnumber(p, &f->type, &f->num);
		} else if (!strncmp(p, "null", 4)) {
			f->type = J_NULL;
			p += 4;
		} else {
			f->type = J_OTHER;
			f->num = *p == 't';   /* a boolean's truth ("freed" of cma-put) */
			p = jskip(p, 1);
		}
		if (!p)
			return NULL;
		if (f != &scratch)
			r->nf++;
		p = ws(p);
		if (*p == '}')
			return p + 1;
		if (*p != ',')
			return NULL;
		p = ws(p + 1);
	}
}

static int parse_reply(const char *line, struct reply *r)
{
	const char *p = ws(line);
	char key[32];

	memset(r, 0, sizeof(*r));
	if (*p != '{')
		return -1;
	p = ws(p + 1);
	if (*p == '}')
		return 0;
	for (;;) {
		p = jstring(p, key, sizeof(key));
		if (!p)
			return -1;
		p = ws(p);
		if (*p != ':')
			return -1;
		p = ws(p + 1);
		if (!strcmp(key, "id")) {
			enum jtype t = J_OTHER;

			if (*p == '-' || (*p >= '0' && *p <= '9'))
				p = jnumber(p, &t, &r->id);
			else
				p = jskip(p, 1);
			r->has_id = t == J_NUM;
		} else if (!strcmp(key, "return") || !strcmp(key, "error")) {
			r->kind = key[0] == 'r' ? R_RETURN : R_ERROR;
			r->nf = 0;
			r->scalar_type = J_NONE;
			if (*p == '{')
				p = jobject(p, r);
			else if (*p == '-' || (*p >= '0' && *p <= '9'))
				p = jnumber(p, &r->scalar_type, &r->scalar);
			else
				p = jskip(p, 1);
		} else {
			p = jskip(p, 1);
		}
		if (!p)
			return -1;
		p = ws(p);
		if (*p == '}')
			break;
		if (*p != ',')
			return -1;
		p = ws(p + 1);
	}
	return *ws(p + 1) == '\0' ? 0 : -1;
}

static const struct jfield *field(const struct reply *r, const char *key)
{
	int i;

	for (i = 0; i < r->nf; i++)
		if (!strcmp(r->f[i].key, key))
			return &r->f[i];
	return NULL;
}

static int field_num(const struct reply *r, const char *key, uint64_t *v)
{
	const struct jfield *f = field(r, key);

	if (!f || f->type != J_NUM)
		return -1;
	*v = f->num;
	return 0;
}

/* ------------------------------------------------------------------ JSON writer */

static size_t jescape(char *out, size_t outsz, const char *s)
{
	size_t n = 0;

	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		char tmp[8];
		size_t k;

		if (c == '"' || c == '\\') {
			tmp[0] = '\\';
			tmp[1] = (char)c;
			k = 2;
		} else if (c < 0x20 || c == 0x7f) {
			k = (size_t)snprintf(tmp, sizeof(tmp), "\\u%04x", c);
		} else {
			tmp[0] = (char)c;
			k = 1;
		}
		if (n + k < outsz) {
			memcpy(out + n, tmp, k);
			n += k;
		}
	}
	if (outsz)
		out[n < outsz ? n : outsz - 1] = '\0';
	return n;
}

/* ------------------------------------------------------------------ channel */

static int write_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;

	while (len) {
		ssize_t n = write(fd, p, len);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/*
 * Reads one line from the channel into out (without the new line). Returns its length,
 * -1 with errno ETIMEDOUT when the deadline passes, or -1 with another errno.
 * 0xFF bytes are dropped; lines over MAX_REPLY are dropped whole.
 */
static ssize_t chan_readline(char *out, uint64_t deadline)
{
	for (;;) {
		char *nl = memchr(rbuf, '\n', rlen);
		struct pollfd pfd;
		uint64_t now;
		ssize_t n;
		size_t i, k;

		if (nl) {
			size_t len = (size_t)(nl - rbuf);
			int drop = rdiscard;

			if (!drop)
				memcpy(out, rbuf, len);
			memmove(rbuf, nl + 1, rlen - len - 1);
			rlen -= len + 1;
			rdiscard = 0;
			if (drop)
				continue;
			out[len] = '\0';
			return (ssize_t)len;
		}
		if (rlen == MAX_REPLY) {
			rdiscard = 1;
			rlen = 0;
		}
		now = now_ns();
		if (now >= deadline) {
			errno = ETIMEDOUT;
			return -1;
		}
		pfd.fd = chan_fd;
		pfd.events = POLLIN;
		pfd.revents = 0;
		n = poll(&pfd, 1, (int)((deadline - now + 999999) / 1000000));
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		if (n == 0)
			continue;
		n = read(chan_fd, rbuf + rlen, MAX_REPLY - rlen);
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return -1;
		}
		if (n == 0) {
			/* virtio ports read 0 while the host end is closed: wait a bit */
			usleep(10000);
			continue;
		}
		for (i = rlen, k = rlen; i < rlen + (size_t)n; i++)
			if ((unsigned char)rbuf[i] != 0xff)
				rbuf[k++] = rbuf[i];
		rlen = k;
	}
}

static int chan_sync(const char *cmd, int quiet)
{
	static char line[MAX_REPLY + 1];
	char req[128];
	unsigned char ff = 0xff;
	uint64_t sync_id, deadline;
	struct reply r;
	int len;

	sync_id = (now_ns() ^ ((uint64_t)getpid() << 16)) & 0x7fffffff;
	len = snprintf(req, sizeof(req),
		       "{\"execute\":\"guest-sync\",\"arguments\":{\"id\":%" PRIu64 "},\"id\":0}\n",
		       sync_id);
	rlen = 0;
	rdiscard = 0;
	if (write_all(chan_fd, &ff, 1) || write_all(chan_fd, req, (size_t)len)) {
		if (!quiet)
			err(cmd, "EIO", "%s: %s", channel_path, strerror(errno));
		return -1;
	}
	deadline = now_ns() + (uint64_t)timeout_ms * 1000000u;
	for (;;) {
		if (chan_readline(line, deadline) < 0) {
			if (!quiet) {
				if (errno == ETIMEDOUT)
					err(cmd, "ETIMEDOUT", "no reply from the agent on %s",
					    channel_path);
				else
					err(cmd, "EIO", "%s: %s", channel_path, strerror(errno));
			}
			return -1;
		}
		if (parse_reply(line, &r) == 0 && r.kind == R_RETURN &&
		    r.scalar_type == J_NUM && r.scalar == sync_id) {
			chan_synced = 1;
			return 0;
		}
	}
}

/*
 * The net channel: "tcp:A.B.C.D:PORT" is a TCP connection (QEMU forwards it to the agent,
 * one connection per stub, so each stub is a session of its own). Returns the fd or -1.
 */
static int chan_connect_tcp(const char *spec)
{
	char host[64];
	const char *colon = strrchr(spec, ':');
	struct sockaddr_in sa;
	size_t n;
	int fd, one = 1;

	if (!colon || colon < spec + 4 || (n = (size_t)(colon - (spec + 4))) >= sizeof(host)) {
		errno = EINVAL;
		return -1;
	}
	memcpy(host, spec + 4, n);
	host[n] = '\0';
	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_port = htons((uint16_t)atoi(colon + 1));
	if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
		errno = EINVAL;
		return -1;
	}
	fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		int e = errno;

		close(fd);
		errno = e;
		return -1;
	}
	return fd;
}

static int chan_open(const char *cmd, int quiet)
{
	if (chan_fd < 0) {
		if (!channel_path || !*channel_path) {
			if (!quiet)
				err(cmd, "ENODEV", "no channel (use -d DEVICE or set CMA_CHANNEL)");
			return -1;
		}
		if (strncmp(channel_path, "tcp:", 4) == 0)
			chan_fd = chan_connect_tcp(channel_path);
		else
			chan_fd = open(channel_path, O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (chan_fd < 0) {
			if (!quiet)
				err(cmd, "ENODEV", "%s: %s", channel_path, strerror(errno));
			return -1;
		}
		if (isatty(chan_fd)) {
			struct termios t;

			if (tcgetattr(chan_fd, &t) == 0) {
				cfmakeraw(&t);
				/* the UART's receive timeout is counted in character times */
				cfsetispeed(&t, B115200);
				cfsetospeed(&t, B115200);
				t.c_cc[VMIN] = 1;
				t.c_cc[VTIME] = 0;
				tcsetattr(chan_fd, TCSANOW, &t);
			}
			tcflush(chan_fd, TCIFLUSH);
		}
		chan_synced = 0;
	}
	if (!chan_synced)
		return chan_sync(cmd, quiet);
	return 0;
}

/*
 * Sends {"execute":EXECUTE[,"arguments":ARGS],"id":N} and waits for the reply with id N.
 * Returns 0 on a "return" reply; prints "CMD: CLASS: desc" and returns -1 otherwise.
 */
static int request(const char *cmd, const char *execute, const char *args, struct reply *r,
		   int quiet)
{
	static char line[MAX_REPLY + 1];
	char req[REQ_SIZE + 128];
	uint64_t id, deadline;
	int len;

	if (chan_open(cmd, quiet))
		return -1;
	id = next_req_id++;
	if (args)
		len = snprintf(req, sizeof(req), "{\"execute\":\"%s\",\"arguments\":%s,\"id\":%" PRIu64 "%s}\n",
			       execute, args, id, owner_member);
	else
		len = snprintf(req, sizeof(req), "{\"execute\":\"%s\",\"id\":%" PRIu64 "%s}\n", execute, id,
			       owner_member);
	if (len < 0 || (size_t)len >= sizeof(req)) {
		if (!quiet)
			err(cmd, "EINVAL", "request too long");
		return -1;
	}
	if (write_all(chan_fd, req, (size_t)len)) {
		if (!quiet)
			err(cmd, "EIO", "%s: %s", channel_path, strerror(errno));
		chan_synced = 0;
		return -1;
	}
	deadline = now_ns() + (uint64_t)timeout_ms * 1000000u;
	for (;;) {
		if (chan_readline(line, deadline) < 0) {
			if (!quiet) {
				if (errno == ETIMEDOUT)
					err(cmd, "ETIMEDOUT", "no reply from the agent");
				else
					err(cmd, "EIO", "%s: %s", channel_path, strerror(errno));
			}
			chan_synced = 0;   /* resync before the next request */
			return -1;
		}
		if (parse_reply(line, r) || !r->has_id || r->id != id)
			continue;
		if (r->kind == R_RETURN)
			return 0;
		if (!quiet) {
			const struct jfield *cls = field(r, "class"), *desc = field(r, "desc");

			if (r->kind == R_ERROR)
				err(cmd, cls && cls->type == J_STR ? cls->str : "GenericError", "%s",
				    desc && desc->type == J_STR ? desc->str : "");
			else
				err(cmd, "EIO", "malformed reply from the agent");
		}
		return -1;
	}
}

/* ------------------------------------------------------------------ chunks */

static struct chunk *chunk_find(int id)
{
	if (id <= 0 || (size_t)id >= slot_cap || !slot[id].live)
		return NULL;
	return &slot[id];
}

static void heap_push(int id)
{
	size_t i = nfreed++;

	while (i > 0 && freed[(i - 1) / 2] > id) {
		freed[i] = freed[(i - 1) / 2];
		i = (i - 1) / 2;
	}
	freed[i] = id;
}

static int heap_pop(void)
{
	int top = freed[0], last = freed[--nfreed];
	size_t i = 0, kid;

	while ((kid = 2 * i + 1) < nfreed) {
		if (kid + 1 < nfreed && freed[kid + 1] < freed[kid])
			kid++;
		if (freed[kid] >= last)
			break;
		freed[i] = freed[kid];
		i = kid;
	}
	freed[i] = last;
	return top;
}

/* Room for id next_fresh in both arrays; -1 when out of memory (nothing changed). */
static int chunk_grow(void)
{
	size_t cap = slot_cap ? slot_cap * 2 : 64;
	struct chunk *s;
	int *f;

	if ((size_t)next_fresh < slot_cap)
		return 0;
	s = realloc(slot, cap * sizeof(*s));
	if (!s)
		return -1;
	slot = s;
	memset(&slot[slot_cap], 0, (cap - slot_cap) * sizeof(*s));
	f = realloc(freed, cap * sizeof(*f));
	if (!f)
		return -1;     /* slot grew but slot_cap did not: harmless, retried next time */
	freed = f;
	slot_cap = cap;
	return 0;
}

/* Record a chunk under the lowest unused id, as the newest: O(log n). */
static struct chunk *chunk_add(uint64_t size, uint64_t addr)
{
	struct chunk *c;
	int id;

	if (nfreed) {
		id = heap_pop();
	} else {
		if (chunk_grow())
			return NULL;
		id = next_fresh++;
	}
	c = &slot[id];
	c->id = id;
	c->live = 1;
	c->size = size;
	c->addr = addr;
	c->prev = newest;
	c->next = 0;
	if (newest)
		slot[newest].next = id;
	else
		oldest = id;
	newest = id;
	return c;
}

/* Unlink a live chunk and make its id reusable: O(log n). */
static void chunk_remove(struct chunk *c)
{
	if (c->prev)
		slot[c->prev].next = c->next;
	else
		oldest = c->next;
	if (c->next)
		slot[c->next].prev = c->prev;
	else
		newest = c->prev;
	c->live = 0;
	heap_push(c->id);
}

static void print_chunk(const struct chunk *c)
{
	printf("%d: 0x%" PRIx64 "@0x%" PRIx64 "\n", c->id, c->size, c->addr);
}

/* ------------------------------------------------------------------ argument parsing */

/* Kernel memparse: strtoull base 0 plus one optional K/M/G suffix; the whole token. */
static int memparse(const char *s, uint64_t *out)
{
	unsigned shift = 0;
	uint64_t v;
	char *end;

	if (*s < '0' || *s > '9')
		return -1;
	errno = 0;
	v = strtoull(s, &end, 0);
	if (errno || end == s)
		return -1;
	switch (*end) {
	case 'K': case 'k': shift = 10; end++; break;
	case 'M': case 'm': shift = 20; end++; break;
	case 'G': case 'g': shift = 30; end++; break;
	default: break;
	}
	if (*end != '\0')
		return -1;
	if (shift && v > (UINT64_MAX >> shift))
		return -1;
	*out = v << shift;
	return 0;
}

/* A decimal number in lo..hi, digits only. */
static int parse_dec(const char *s, uint64_t lo, uint64_t hi, uint64_t *out)
{
	uint64_t v = 0;

	if (!*s)
		return -1;
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			return -1;
		v = v * 10 + (uint64_t)(*s - '0');
		if (v > hi)
			return -1;
	}
	if (v < lo)
		return -1;
	*out = v;
	return 0;
}

static int parse_pattern(const char *s, uint32_t *out)
{
	uint64_t v;
	char *end;

	if (*s < '0' || *s > '9')
		return -1;
	errno = 0;
	v = strtoull(s, &end, 0);
	if (errno || *end != '\0' || v > 0xffffffffu)
		return -1;
	*out = (uint32_t)v;
	return 0;
}

/* DEV[/KIND], split at the last '/'. Returns -1 when either part is too long. */
static int parse_devkind(char *tok, const char **dev, const char **kind)
{
	char *slash = strrchr(tok, '/');

	*dev = tok;
	*kind = "";
	if (slash) {
		*slash = '\0';
		*kind = slash + 1;
	}
	return strlen(*dev) > MAX_NAME || strlen(*kind) > MAX_NAME ? -1 : 0;
}

/* SIZE[/ALIGN]: returns 0, -1 (invalid size) or -2 (invalid alignment). */
static int parse_size_align(char *tok, uint64_t *size, uint64_t *align, int allow_align)
{
	char *slash = allow_align ? strchr(tok, '/') : NULL;

	*align = 0;
	if (slash)
		*slash = '\0';
	if (memparse(tok, size) || *size == 0)
		return -1;
	if (slash && (memparse(slash + 1, align) || (*align & (*align - 1))))
		return -2;
	return 0;
}

/* ------------------------------------------------------------------ commands */

struct cmdline {
	const char *cmd;
	int n;                     /* arguments after the command word */
	char *arg[MAX_TOKENS];
};

static int need_args(const struct cmdline *c, int want)
{
	if (c->n < want) {
		err(c->cmd, "EINVAL", "missing argument");
		return -1;
	}
	return 0;
}

static int no_more_args(const struct cmdline *c, int used)
{
	if (c->n > used) {
		err(c->cmd, "EINVAL", "unknown arguments at the end");
		return -1;
	}
	return 0;
}

static int parse_id(const struct cmdline *c, const char *s, int *id)
{
	uint64_t v;

	if (parse_dec(s, 1, 2147483647u, &v)) {
		err(c->cmd, "EINVAL", "invalid chunk id");
		return -1;
	}
	*id = (int)v;
	return 0;
}

static struct chunk *lookup(const struct cmdline *c, int id)
{
	struct chunk *ch = chunk_find(id);

	if (!ch)
		err(c->cmd, "ENOENT", "no chunk %d", id);
	return ch;
}

static int size_error(const struct cmdline *c, int rc)
{
	if (rc == -1)
		err(c->cmd, "EINVAL", "invalid size");
	else if (rc == -2)
		err(c->cmd, "EINVAL", "invalid alignment");
	return rc;
}

static int alloc_request(const char *cmd, const char *execute, const char *args, uint64_t *addr,
			 int quiet)
{
	struct reply r;

	if (request(cmd, execute, args, &r, quiet))
		return -1;
	if (field_num(&r, "addr", addr)) {
		if (!quiet)
			err(cmd, "EIO", "malformed reply from the agent");
		return -1;
	}
	return 0;
}

static int free_request(const char *cmd, uint64_t addr, int quiet)
{
	char args[64];
	struct reply r;

	snprintf(args, sizeof(args), "{\"addr\":%" PRIu64 "}", addr);
	return request(cmd, "cma-free", args, &r, quiet);
}

static void format_alloc_args(char *args, size_t sz, const char *dev, const char *kind,
			      uint64_t size, uint64_t align)
{
	char edev[MAX_NAME * 6 + 1], ekind[MAX_NAME * 6 + 1];

	jescape(edev, sizeof(edev), dev);
	jescape(ekind, sizeof(ekind), kind);
	snprintf(args, sz,
		 "{\"dev\":\"%s\",\"kind\":\"%s\",\"size\":%" PRIu64 ",\"alignment\":%" PRIu64 "}",
		 edev, ekind, size, align);
}

static void do_alloc(const struct cmdline *c, int from)
{
	static char args[REQ_SIZE], eregions[MAX_LINE * 6 + 1];
	const char *dev = NULL, *kind = NULL;
	uint64_t size, align, addr;
	struct chunk *ch;

	if (need_args(c, 2))
		return;
	if (!from && parse_devkind(c->arg[0], &dev, &kind)) {
		err(c->cmd, "EINVAL", "name or kind too long");
		return;
	}
	if (size_error(c, parse_size_align(c->arg[1], &size, &align, 1)))
		return;
	if (no_more_args(c, 2))
		return;
	if (from) {
		jescape(eregions, sizeof(eregions), c->arg[0]);
		snprintf(args, sizeof(args),
			 "{\"regions\":\"%s\",\"size\":%" PRIu64 ",\"alignment\":%" PRIu64 "}",
			 eregions, size, align);
	} else {
		format_alloc_args(args, sizeof(args), dev, kind, size, align);
	}
	if (alloc_request(c->cmd, from ? "cma-alloc-from" : "cma-alloc", args, &addr, 0))
		return;
	ch = chunk_add(size, addr);
	if (!ch) {
		err(c->cmd, "ENOMEM", "out of memory");
		free_request(c->cmd, addr, 1);
		return;
	}
	print_chunk(ch);
}

static void do_free(const struct cmdline *c)
{
	struct chunk *ch;
	int id;

	if (c->n == 0) {
		if (!newest) {
			err(c->cmd, "ENOENT", "no chunks");
			return;
		}
		ch = &slot[newest];
	} else {
		if (parse_id(c, c->arg[0], &id) || no_more_args(c, 1))
			return;
		ch = lookup(c, id);
		if (!ch)
			return;
	}
	if (free_request(c->cmd, ch->addr, 0) == 0)
		chunk_remove(ch);
}

static void do_list(const struct cmdline *c)
{
	int id;

	if (no_more_args(c, 0))
		return;
	for (id = oldest; id; id = slot[id].next)
		print_chunk(&slot[id]);
}

static void do_info(const struct cmdline *c)
{
	char edev[MAX_NAME * 6 + 1], ekind[MAX_NAME * 6 + 1], args[256];
	uint64_t count, total, freesz, lower, upper;
	const char *dev, *kind;
	struct reply r;

	if (need_args(c, 1))
		return;
	if (parse_devkind(c->arg[0], &dev, &kind)) {
		err(c->cmd, "EINVAL", "name or kind too long");
		return;
	}
	if (no_more_args(c, 1))
		return;
	jescape(edev, sizeof(edev), dev);
	jescape(ekind, sizeof(ekind), kind);
	snprintf(args, sizeof(args), "{\"dev\":\"%s\",\"kind\":\"%s\"}", edev, ekind);
	if (request(c->cmd, "cma-info", args, &r, 0))
		return;
	if (field_num(&r, "count", &count) || field_num(&r, "total_size", &total) ||
	    field_num(&r, "free_size", &freesz) || field_num(&r, "lower_bound", &lower) ||
	    field_num(&r, "upper_bound", &upper)) {
		err(c->cmd, "EIO", "malformed reply from the agent");
		return;
	}
	printf("info: count=%" PRIu64 " total=0x%" PRIx64 " free=0x%" PRIx64 " lower=0x%" PRIx64
	       " upper=0x%" PRIx64 "\n", count, total, freesz, lower, upper);
}

/* write (verify == 0) or verify (verify == 1) word[i] = PATTERN + i through /dev/mem. */
static void do_memory(const struct cmdline *c, int verify)
{
	long page = sysconf(_SC_PAGESIZE);
	uint64_t nwords, base, span, i;
	volatile uint32_t *w;
	struct chunk *ch;
	uint32_t pattern;
	void *map;
	int id, fd;

	if (need_args(c, 2) || parse_id(c, c->arg[0], &id))
		return;
	if (parse_pattern(c->arg[1], &pattern)) {
		err(c->cmd, "EINVAL", "invalid pattern");
		return;
	}
	if (no_more_args(c, 2))
		return;
	ch = lookup(c, id);
	if (!ch)
		return;
	if (page <= 0)
		page = 4096;
	nwords = ch->size / 4 + (ch->size % 4 != 0);
	base = ch->addr & ~((uint64_t)page - 1);
	span = (ch->addr - base) + nwords * 4;
	span = (span + (uint64_t)page - 1) & ~((uint64_t)page - 1);
	if (span > SIZE_MAX || ch->size > UINT64_MAX - 3) {
		err(c->cmd, "EINVAL", "chunk too large to map");
		return;
	}
	fd = open("/dev/mem", (verify ? O_RDONLY : O_RDWR) | O_SYNC | O_CLOEXEC);
	if (fd < 0) {
		err(c->cmd, "EIO", "/dev/mem: %s", strerror(errno));
		return;
	}
	map = mmap(NULL, (size_t)span, verify ? PROT_READ : PROT_READ | PROT_WRITE, MAP_SHARED, fd,
		   (off_t)base);
	close(fd);
	if (map == MAP_FAILED) {
		err(c->cmd, "EIO", "mmap /dev/mem at 0x%" PRIx64 ": %s", base, strerror(errno));
		return;
	}
	w = (volatile uint32_t *)((char *)map + (ch->addr - base));
	for (i = 0; i < nwords; i++) {
		uint32_t want = htole32((uint32_t)(pattern + i));

		if (!verify) {
			w[i] = want;
		} else if (w[i] != want) {
			err(c->cmd, "EIO", "mismatch at offset 0x%" PRIx64, i * 4);
			break;
		}
	}
	munmap(map, (size_t)span);
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

/* Nearest rank: the smallest value with at least p% of the samples at or below it. */
static uint64_t percentile(const uint64_t *sorted, uint64_t n, unsigned p)
{
	uint64_t rank = (n * p + 99) / 100;

	return sorted[rank ? rank - 1 : 0];
}

static void do_timing(const struct cmdline *c, int bench)
{
	static char args[REQ_SIZE];
	const char *dev = NULL, *kind = NULL;
	uint64_t n, size = 0, align, i, *us;
	struct reply r;

	if (need_args(c, bench ? 3 : 1))
		return;
	if (parse_dec(c->arg[0], 1, MAX_COUNT, &n)) {
		err(c->cmd, "EINVAL", "invalid count");
		return;
	}
	if (bench) {
		if (parse_devkind(c->arg[1], &dev, &kind)) {
			err(c->cmd, "EINVAL", "name or kind too long");
			return;
		}
		if (size_error(c, parse_size_align(c->arg[2], &size, &align, 0)))
			return;
	}
	if (no_more_args(c, bench ? 3 : 1))
		return;
	if (bench)
		format_alloc_args(args, sizeof(args), dev, kind, size, 0);
	us = malloc((size_t)n * sizeof(*us));
	if (!us) {
		err(c->cmd, "ENOMEM", "out of memory");
		return;
	}
	for (i = 0; i < n; i++) {
		uint64_t t0 = now_ns(), addr;

		/* bench times the alloc round trip alone (comparable with ping); the free
		 * that gives the chunk back is a second, untimed round trip */
		if (bench) {
			if (alloc_request(c->cmd, "cma-alloc", args, &addr, 0))
				break;
			us[i] = (now_ns() - t0) / 1000;
			if (free_request(c->cmd, addr, 0))
				break;
			continue;
		}
		if (request(c->cmd, "guest-ping", NULL, &r, 0))
			break;
		us[i] = (now_ns() - t0) / 1000;
	}
	if (i == n) {
		qsort(us, (size_t)n, sizeof(*us), cmp_u64);
		printf("%s: n=%" PRIu64 " p50=%" PRIu64 "us p99=%" PRIu64 "us\n",
		       bench ? "bench" : "ping", n, percentile(us, n, 50), percentile(us, n, 99));
	}
	free(us);
}

static void execute(char *line)
{
	struct cmdline c;
	char *p = line, *word;

	memset(&c, 0, sizeof(c));
	c.n = -1;
	for (;;) {
		while (*p == ' ' || *p == '\t')
			p++;
		if (!*p)
			break;
		word = p;
		while (*p && *p != ' ' && *p != '\t')
			p++;
		if (*p)
			*p++ = '\0';
		if (c.n < 0)
			c.cmd = word;
		else if (c.n < MAX_TOKENS)
			c.arg[c.n] = word;
		c.n++;
	}
	if (!c.cmd)
		return;

#define IS(w, alias) (!strcmp(c.cmd, w) || !strcmp(c.cmd, alias))
	if (IS("alloc", "a"))
		do_alloc(&c, 0);
	else if (IS("alloc-from", "r"))
		do_alloc(&c, 1);
	else if (IS("free", "f"))
		do_free(&c);
	else if (IS("list", "l"))
		do_list(&c);
	else if (IS("info", "i"))
		do_info(&c);
	else if (IS("write", "w"))
		do_memory(&c, 0);
	else if (IS("verify", "v"))
		do_memory(&c, 1);
	else if (IS("bench", "b"))
		do_timing(&c, 1);
	else if (IS("ping", "p"))
		do_timing(&c, 0);
	else
		err(c.cmd, "EINVAL", "unknown command");
#undef IS
}

/* ------------------------------------------------------------------ kernel daemon */

#define CTL_PATH "/dev/cma-ctl"

/* The errno of an agent's error class (docs/protocol.md); GenericError is a bad request. */
static int errno_of(const char *cls)
{
	static const struct { const char *name; int value; } known[] = {
		{"EINVAL", EINVAL}, {"ENOMEM", ENOMEM}, {"ENOENT", ENOENT},
		{"EADDRINUSE", EADDRINUSE}, {"EBUSY", EBUSY}, {"ENOSPC", ENOSPC},
		{"EPERM", EPERM}, {"EEXIST", EEXIST}, {"ENODEV", ENODEV}, {"ERANGE", ERANGE},
		{"EFAULT", EFAULT}, {"EAGAIN", EAGAIN}, {"ETIMEDOUT", ETIMEDOUT}, {"EIO", EIO},
		{"ENOSYS", ENOSYS}, {"EOVERFLOW", EOVERFLOW}, {"GenericError", EINVAL},
	};
	size_t i;

	for (i = 0; i < sizeof(known) / sizeof(known[0]); i++)
		if (!strcmp(cls, known[i].name))
			return known[i].value;
	return EIO;
}

/* The JSON command of one kernel request; NULL for an unknown op. */
static const char *kernel_command(const struct cma_ctl_request *q, char *args, size_t sz)
{
	char a[CMA_CTL_NAME_SIZE * 6 + 1], b[CMA_CTL_REGIONS_SIZE * 6 + 1];

	switch (q->op) {
	case CMA_CTL_ALLOC:
		jescape(a, sizeof(a), q->dev);
		jescape(b, sizeof(b), q->kind);
		snprintf(args, sz, "{\"dev\":\"%s\",\"kind\":\"%s\",\"size\":%" PRIu64
			 ",\"alignment\":%" PRIu64 "}", a, b, (uint64_t)q->size,
			 (uint64_t)q->alignment);
		return "cma-alloc";
	case CMA_CTL_ALLOC_FROM:
		jescape(b, sizeof(b), q->regions);
		if (q->regions[0])
			snprintf(args, sz, "{\"regions\":\"%s\",\"size\":%" PRIu64
				 ",\"alignment\":%" PRIu64 "}", b, (uint64_t)q->size,
				 (uint64_t)q->alignment);
		else
			snprintf(args, sz, "{\"regions\":null,\"size\":%" PRIu64
				 ",\"alignment\":%" PRIu64 "}", (uint64_t)q->size,
				 (uint64_t)q->alignment);
		return "cma-alloc-from";
	case CMA_CTL_FREE:
	case CMA_CTL_GET:
	case CMA_CTL_PUT:
		snprintf(args, sz, "{\"addr\":%" PRIu64 "}", (uint64_t)q->addr);
		return q->op == CMA_CTL_FREE ? "cma-free" : q->op == CMA_CTL_GET ? "cma-get"
									  : "cma-put";
	case CMA_CTL_INFO:
		jescape(a, sizeof(a), q->dev);
		jescape(b, sizeof(b), q->kind);
		snprintf(args, sz, "{\"dev\":\"%s\",\"kind\":\"%s\"}", a, b);
		return "cma-info";
	case CMA_CTL_INFO_ABOUT:
		jescape(b, sizeof(b), q->regions);
		if (q->regions[0])
			snprintf(args, sz, "{\"regions\":\"%s\"}", b);
		else
			snprintf(args, sz, "{\"regions\":null}");
		return "cma-info-about";
	}
	return NULL;
}

static void kernel_answer(const struct cma_ctl_request *q, struct cma_ctl_reply *a)
{
	static struct reply r;
	char args[REQ_SIZE];
	const char *execute;
	uint64_t v;

	memset(a, 0, sizeof(*a));
	a->seq = q->seq;
	execute = kernel_command(q, args, sizeof(args));
	if (!execute) {
		a->error = -EINVAL;
		return;
	}
	memset(&r, 0, sizeof(r));
	errno = 0;
	if (request("kernel", execute, args, &r, 1)) {
		const struct jfield *cls = field(&r, "class");

		if (r.kind == R_ERROR && r.has_id && r.id == next_req_id - 1)
			a->error = -errno_of(cls && cls->type == J_STR ? cls->str : "");
		else
			a->error = errno == ETIMEDOUT ? -ETIMEDOUT : -EIO;
		return;
	}
	if (!field_num(&r, "addr", &v))
		a->addr = v;
	if (!field_num(&r, "size", &v))
		a->size = v;
	if (!field_num(&r, "lower_bound", &v))
		a->lower_bound = v;
	if (!field_num(&r, "upper_bound", &v))
		a->upper_bound = v;
	if (!field_num(&r, "total_size", &v))
		a->total_size = v;
	if (!field_num(&r, "free_size", &v))
		a->free_size = v;
	if (!field_num(&r, "count", &v))
		a->count = v;
	if (q->op == CMA_CTL_PUT) {
		const struct jfield *freed = field(&r, "freed");

		a->count = freed && freed->num;
	}
}

/*
 * -k: hold the channel and /dev/cma-ctl, answer the module's requests one at a time. Runs
 * until killed; closing /dev/cma-ctl (by exit) makes the module fail waiting callers with
 * ENODEV.
 */
static int serve_kernel(void)
{
	struct cma_ctl_request q;
	struct cma_ctl_reply a;
	int ctl = open(CTL_PATH, O_RDWR | O_CLOEXEC);

	if (ctl < 0) {
		err("kernel", errno == EBUSY ? "EBUSY" : "ENODEV", "%s: %s%s", CTL_PATH,
		    strerror(errno), errno == ENOENT ? " (is the cma_guest module loaded?)" : "");
		return 1;
	}
	owner_member = ",\"owner\":\"kernel\"";   /* the chunks are the guest kernel's */
	if (chan_open("kernel", 0))
		return 1;
	/* the ready line: a daemon that holds both ends (tests and scripts wait for it) */
	fprintf(stderr, "kernel: serving %s on %s\n", CTL_PATH, channel_path);
	for (;;) {
		ssize_t n = read(ctl, &q, sizeof(q));

		if (n < 0 && errno == EINTR)
			continue;
		if (n != (ssize_t)sizeof(q)) {
			err("kernel", "EIO", "%s: %s", CTL_PATH, n < 0 ? strerror(errno) : "short read");
			return 1;
		}
		kernel_answer(&q, &a);
		if (write(ctl, &a, sizeof(a)) != (ssize_t)sizeof(a)) {
			err("kernel", "EIO", "%s: %s", CTL_PATH, strerror(errno));
			return 1;
		}
	}
}

/* ------------------------------------------------------------------ main */

/* Exit status (docs/line-format.md): 0 every line succeeded, 1 some line printed an error,
 * 2 bad usage; -k has its own. */
int main(int argc, char **argv)
{
	static char line[MAX_LINE + 2], prev[MAX_LINE + 2], work[MAX_LINE + 2];
	int have_prev = 0, interactive, opt, kernel = 0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	channel_path = getenv("CMA_CHANNEL");
	while ((opt = getopt(argc, argv, "d:t:hk")) != -1) {
		switch (opt) {
		case 'd':
			channel_path = optarg;
			break;
		case 't': {
			uint64_t s;

			if (parse_dec(optarg, 1, 86400, &s)) {
				fprintf(stderr, "cma-test: invalid timeout %s\n", optarg);
				return 2;
			}
			timeout_ms = (int)s * 1000;
			break;
		}
		case 'h':
			usage(stdout);
			return 0;
		case 'k':
			kernel = 1;
			break;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind < argc) {
		usage(stderr);
		return 2;
	}
	if (kernel)
		return serve_kernel();
	interactive = isatty(STDIN_FILENO);
	if (interactive)
		usage(stderr);

	for (;;) {
		size_t len = 0;
		int ch, too_long = 0;
		char *p;

		if (interactive) {	/* a prompt tells a person (or pexpect) we are ready */
			fputs("cma-test> ", stdout);
			fflush(stdout);
		}

		while ((ch = getchar()) != EOF && ch != '\n') {
			if (len < MAX_LINE)
				line[len] = (char)ch;
			else
				too_long = 1;
			len++;
		}
		if (ch == EOF && len == 0)
			break;
		if (too_long) {
			err("input", "EINVAL", "line too long");
		} else if (ch == EOF) {
			err("input", "EINVAL", "no new line at EOF");
		} else {
			line[len] = '\0';
			p = line;
			while (*p == ' ' || *p == '\t')
				p++;
			if (*p == '#')
				continue;
			if (*p) {
				strcpy(prev, p);
				have_prev = 1;
			} else if (!have_prev) {
				continue;
			}
			strcpy(work, prev);
			execute(work);
		}
		if (ch == EOF)
			break;
	}

	/* like closing the /dev/cma fds at exit: give every chunk back, silently */
	if (chan_fd >= 0)
		while (newest) {
			free_request("exit", slot[newest].addr, 1);
			chunk_remove(&slot[newest]);
		}
	return error_lines ? 1 : 0;
}
