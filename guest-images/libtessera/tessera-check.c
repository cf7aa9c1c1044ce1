/* SPDX-License-Identifier: Apache-2.0 OR MIT */
/*
 * tessera-check: libtessera end to end, from C. Built twice by the Makefile: tessera-check
 * (libtessera.so.1 and glibc linked dynamically) and tessera-check-static.
 *
 *   tessera-check [-d N] [TEST...]      TEST: jobs | sysmem | isolate | fault | kill | all
 *
 *   jobs     saxpy, sgemm, reduce, crc32, copy and fill with buffers in VRAM, each result
 *            checked bit-exactly against the CPU; the CPU writes inputs and reads results
 *            through the driver's mmap of VRAM (the BAR 2 aperture)
 *   sysmem   the same with buffers in guest RAM
 *   isolate  two processes, each with its own context, work at the same GPU addresses at the
 *            same time: neither sees the other's data, a GPU access to the other's address
 *            faults, and the other's mmap offset is not a buffer of this file
 *   fault    one process faults its context while another goes on: the faulting one gets
 *            EIO and the fault's code and address, the other finishes every job
 *   kill     a process killed while its job runs leaves the device usable: the next process
 *            runs a job, and the killed one's context is released
 *
 * The device is TESSERA_DEVICE when it is set (a device node, unix:PATH or
 * tls://HOST:PORT/INSTANCE: the same tests run over a GPU session; jobs and sysmem are the
 * ones that mean the same there), else /dev/tessera/vgpuN.
 *
 * One line per test: "tessera-check: <test> ok (...)" or "tessera-check: <test> FAIL: ...".
 * Exit status: 0 when all passed, 1 otherwise, 2 on bad usage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tessera.h"

static int dev_index;

/* A failed check: the message goes into buf, the test returns -1. */
static char why[256];
static int failf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int failf(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	return -1;
}

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* Deterministic data, the same generator as the Rust tools (reference.rs). */
static void xorshift(uint32_t seed, uint32_t *out, size_t n)
{
	uint32_t x = seed | 1;

	for (size_t i = 0; i < n; i++) {
		x ^= x << 13;
		x ^= x >> 17;
		x ^= x << 5;
		out[i] = x;
	}
}

/* Small floats in [-2, 2) with few mantissa bits. */
static void floats(uint32_t seed, float *out, size_t n)
{
	uint32_t *raw = malloc(n * sizeof(*raw));

	xorshift(seed, raw, n);
	for (size_t i = 0; i < n; i++)
		out[i] = (float)((raw[i] >> 8) % 64) / 16.0f - 2.0f;
	free(raw);
}

/*
 * fmaf(x, y, z), the device's fused multiply-add, without libm (the dynamic check then needs
 * only libc): x*y is exact in a double; the double sum is rounded to odd (TwoSum gives its
 * exact error, and an even result with an error moves one unit toward the exact sum); a
 * double has 53 >= 24 + 2 bits, so the one rounding to float that follows gives the
 * correctly rounded fused result (Boldo and Melquiond, "Emulation of FMA and correctly
 * rounded sums: proved algorithms using rounding to odd").
 */
static float fma_f32(float x, float y, float z)
{
	double p = (double)x * y, s = p + z, v = s - p;
	double err = (p - (s - v)) + ((double)z - v);
	uint64_t bits;

	memcpy(&bits, &s, sizeof(bits));
	if (err != 0 && !(bits & 1)) {
		bits += (err > 0) == (s > 0) ? 1 : -1;
		memcpy(&s, &bits, sizeof(bits));
	}
	return (float)s;
}

static uint32_t crc32_cpu(const uint8_t *p, size_t len)
{
	uint32_t c = ~0U;

	for (size_t i = 0; i < len; i++) {
		c ^= p[i];
		for (int k = 0; k < 8; k++)
			c = (c & 1) ? 0xedb88320U ^ (c >> 1) : c >> 1;
	}
	return ~c;
}

static int bo(tessera_dev *d, uint64_t size, uint32_t place, tessera_bo **out)
{
	int err = tessera_bo_create(d, size, place, out);

	return err ? failf("buffer of %llu bytes: %s", (unsigned long long)size, strerror(-err)) : 0;
}

static int run(tessera_dev *d, struct tvgpu_packet p, const char *what)
{
	int err = tessera_run(d, &p, 1, 10LL * 1000 * 1000 * 1000);

	if (err == -EIO) {
		struct tvgpu_ctx_state st;

		tessera_ctx_state(d, &st);
		return failf("%s: the context faulted: %s at %#llx", what,
			     tessera_fault_name(st.fault_code), (unsigned long long)st.fault_addr);
	}
	return err ? failf("%s: %s", what, strerror(-err)) : 0;
}

static int saxpy(tessera_dev *d, uint32_t place)
{
	const size_t n = 1 << 16;
	const float a = 1.5f;
	float *x = malloc(n * 4), *y = malloc(n * 4);
	tessera_bo *bx = NULL, *by = NULL;
	int ret;

	floats(1, x, n);
	floats(2, y, n);
	ret = bo(d, n * 4, place, &bx) ?: bo(d, n * 4, place, &by);
	if (!ret) {
		memcpy(tessera_bo_cpu(bx), x, n * 4);
		memcpy(tessera_bo_cpu(by), y, n * 4);
		ret = run(d, tessera_pkt_saxpy(n, a, tessera_bo_va(bx), tessera_bo_va(by)), "saxpy");
	}
	for (size_t i = 0; !ret && i < n; i++) {
		float want = fma_f32(a, x[i], y[i]);
		float got = ((const float *)tessera_bo_cpu(by))[i];

		if (memcmp(&got, &want, 4))
			ret = failf("saxpy: y[%zu] = %g, the CPU says %g", i, got, want);
	}
	tessera_bo_destroy(bx);
	tessera_bo_destroy(by);
	free(x);
	free(y);
	return ret;
}

static int sgemm(tessera_dev *d, uint32_t place)
{
	const size_t m = 64, n = 48, k = 32;
	float *a = malloc(m * k * 4), *b = malloc(k * n * 4), *c = calloc(m * n, 4);
	tessera_bo *ba = NULL, *bb = NULL, *bc = NULL;
	int ret;

	floats(3, a, m * k);
	floats(4, b, k * n);
	for (size_t r = 0; r < m; r++)
		for (size_t p = 0; p < k; p++)
			for (size_t j = 0; j < n; j++)
				c[r * n + j] = fma_f32(a[r * k + p], b[p * n + j], c[r * n + j]);
	ret = bo(d, m * k * 4, place, &ba) ?: bo(d, k * n * 4, place, &bb) ?:
	      bo(d, m * n * 4, place, &bc);
	if (!ret) {
		memcpy(tessera_bo_cpu(ba), a, m * k * 4);
		memcpy(tessera_bo_cpu(bb), b, k * n * 4);
		ret = run(d, tessera_pkt_sgemm(m, n, k, tessera_bo_va(ba), tessera_bo_va(bb),
					       tessera_bo_va(bc)), "sgemm");
	}
	if (!ret && memcmp(tessera_bo_cpu(bc), c, m * n * 4))
		ret = failf("sgemm: C differs from the CPU's");
	tessera_bo_destroy(ba);
	tessera_bo_destroy(bb);
	tessera_bo_destroy(bc);
	free(a);
	free(b);
	free(c);
	return ret;
}

static int reduce(tessera_dev *d, uint32_t place)
{
	const size_t n = 1 << 16;
	uint32_t *x = malloc(n * 4);
	uint64_t want = 0, got;
	tessera_bo *bx = NULL, *bo_out = NULL;
	int ret;

	xorshift(5, x, n);
	for (size_t i = 0; i < n; i++)
		want += x[i];
	ret = bo(d, n * 4, place, &bx) ?: bo(d, 8, place, &bo_out);
	if (!ret) {
		memcpy(tessera_bo_cpu(bx), x, n * 4);
		ret = run(d, tessera_pkt_reduce_sum(n, tessera_bo_va(bx), tessera_bo_va(bo_out)),
			  "reduce");
	}
	if (!ret) {
		memcpy(&got, tessera_bo_cpu(bo_out), 8);
		if (got != want)
			ret = failf("reduce: %llu, the CPU says %llu", (unsigned long long)got,
				    (unsigned long long)want);
	}
	tessera_bo_destroy(bx);
	tessera_bo_destroy(bo_out);
	free(x);
	return ret;
}

/* CRC-32 of len bytes of data at src (already in a buffer), checked against the CPU. */
static int crc_of(tessera_dev *d, tessera_bo *src, tessera_bo *out, size_t len, const char *what)
{
	uint32_t got, want = crc32_cpu(tessera_bo_cpu(src), len);
	int ret = run(d, tessera_pkt_crc32(len, tessera_bo_va(src), tessera_bo_va(out)), what);

	if (ret)
		return ret;
	memcpy(&got, tessera_bo_cpu(out), 4);
	return got == want ? 0 : failf("%s: %#x, the CPU says %#x", what, got, want);
}

static int crc32(tessera_dev *d, uint32_t place)
{
	const size_t len = 1 << 20;
	tessera_bo *src = NULL, *out = NULL;
	int ret = bo(d, len, place, &src) ?: bo(d, 4, place, &out);

	if (!ret) {
		xorshift(6, tessera_bo_cpu(src), len / 4);
		ret = crc_of(d, src, out, len, "crc32");
	}
	tessera_bo_destroy(src);
	tessera_bo_destroy(out);
	return ret;
}

/*
 * COPY from guest RAM into a buffer of `place`, read back by the CPU through that buffer's
 * mapping (for VRAM, the driver's mmap of the aperture); then a copy at odd offsets and an
 * odd length inside `place`, whose neighbouring bytes must stay as they were.
 */
static int copy(tessera_dev *d, uint32_t place)
{
	const size_t len = 256 << 10, odd = 100003;
	tessera_bo *src = NULL, *mid = NULL, *dst = NULL;
	uint8_t *want = malloc(len);
	int ret = bo(d, len, TESSERA_BO_SYSMEM, &src) ?: bo(d, len, place, &mid) ?:
		  bo(d, len, place, &dst);

	if (!ret) {
		xorshift(7, tessera_bo_cpu(src), len / 4);
		memset(tessera_bo_cpu(dst), 0x5a, len);
		ret = run(d, tessera_pkt_copy(tessera_bo_va(src), tessera_bo_va(mid), len), "copy");
	}
	if (!ret && memcmp(tessera_bo_cpu(mid), tessera_bo_cpu(src), len))
		ret = failf("copy: the destination does not hold the source");
	if (!ret)
		ret = run(d, tessera_pkt_copy(tessera_bo_va(mid) + 3, tessera_bo_va(dst) + 5, odd),
			  "copy at odd offsets");
	if (!ret) {
		memset(want, 0x5a, len);
		memcpy(want + 5, (uint8_t *)tessera_bo_cpu(src) + 3, odd);
		if (memcmp(tessera_bo_cpu(dst), want, len))
			ret = failf("copy at odd offsets: wrong bytes in or around the copy");
	}
	tessera_bo_destroy(src);
	tessera_bo_destroy(mid);
	tessera_bo_destroy(dst);
	free(want);
	return ret;
}

/* FILL of a range inside a buffer: the range holds the pattern, its neighbours do not change. */
static int fill(tessera_dev *d, uint32_t place)
{
	const size_t words = 64 << 10, first = 3, count = words - 7;
	tessera_bo *b = NULL;
	int ret = bo(d, words * 4, place, &b);
	uint32_t *cpu;

	if (ret)
		return ret;
	cpu = tessera_bo_cpu(b);
	for (size_t i = 0; i < words; i++)
		cpu[i] = (uint32_t)i;
	ret = run(d, tessera_pkt_fill(tessera_bo_va(b) + first * 4, count * 4, 0xc0ffee11U), "fill");
	for (size_t i = 0; !ret && i < words; i++) {
		uint32_t want = i >= first && i < first + count ? 0xc0ffee11U : (uint32_t)i;

		if (cpu[i] != want)
			ret = failf("fill: word %zu is %#x, expected %#x", i, cpu[i], want);
	}
	tessera_bo_destroy(b);
	return ret;
}

static tessera_dev *open_dev(void)
{
	tessera_dev *d = tessera_open(dev_index);

	if (!d)
		failf("open device %d: %s", dev_index, tessera_last_error());
	return d;
}

static int jobs_in(uint32_t place)
{
	static const struct {
		const char *name;
		int (*fn)(tessera_dev *, uint32_t);
	} jobs[] = {
		{ "saxpy", saxpy }, { "sgemm", sgemm }, { "reduce", reduce },
		{ "crc32", crc32 }, { "copy", copy },	{ "fill", fill },
	};
	tessera_dev *d = open_dev();
	int ret = d ? 0 : -1;

	for (size_t i = 0; !ret && i < sizeof(jobs) / sizeof(jobs[0]); i++)
		ret = jobs[i].fn(d, place);
	if (d)
		tessera_close(d);
	return ret;
}

static int jobs_vram(void)
{
	return jobs_in(TESSERA_BO_VRAM);
}

static int jobs_sysmem(void)
{
	return jobs_in(TESSERA_BO_SYSMEM);
}

/* Pipes between a parent and its child: one byte (or one u64) each way. */
struct chan {
	int to_child[2], to_parent[2];
};

static void send_u64(int fd, uint64_t v)
{
	if (write(fd, &v, sizeof(v)) != sizeof(v))
		_exit(3);
}

static uint64_t recv_u64(int fd)
{
	uint64_t v = 0;

	if (read(fd, &v, sizeof(v)) != sizeof(v))
		_exit(3);
	return v;
}

/* The child's verdict: 0 when it exited 0, else a message. */
static int child_verdict(pid_t pid, const char *who)
{
	int status;

	if (waitpid(pid, &status, 0) != pid)
		return failf("waitpid %s: %s", who, strerror(errno));
	if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
		return 0;
	return failf("%s failed (%s %d)", who, WIFEXITED(status) ? "status" : "signal",
		     WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
}

/* A VRAM buffer made with the driver's ioctls directly: its handle, mmap offset and GPU VA. */
struct raw_bo {
	uint32_t handle;
	uint64_t mmap_offset, va;
};

static int raw_bo(tessera_dev *d, uint64_t size, struct raw_bo *out)
{
	struct tvgpu_bo_create c = { .size = size, .flags = TVGPU_BO_VRAM };
	struct tvgpu_map m = { .size = size };

	if (ioctl(tessera_fd(d), TVGPU_IOCTL_BO_CREATE, &c))
		return failf("TVGPU_IOCTL_BO_CREATE: %s", strerror(errno));
	m.handle = c.handle;
	if (ioctl(tessera_fd(d), TVGPU_IOCTL_MAP, &m))
		return failf("TVGPU_IOCTL_MAP: %s", strerror(errno));
	*out = (struct raw_bo){ .handle = c.handle, .mmap_offset = c.mmap_offset, .va = m.va };
	return 0;
}

/* pipe() both ways and fork(): the child's pid, 0 in the child, -1 (with a message) on failure. */
static pid_t fork_with_chan(struct chan *c)
{
	pid_t pid;

	if (pipe(c->to_child) || pipe(c->to_parent))
		return failf("pipe: %s", strerror(errno));
	pid = fork();
	if (pid < 0)
		return failf("fork: %s", strerror(errno));
	/* Each side keeps only its ends: a side that dies makes the other's read return 0. */
	if (pid == 0) {
		close(c->to_child[1]);
		close(c->to_parent[0]);
	} else {
		close(c->to_child[0]);
		close(c->to_parent[1]);
	}
	return pid;
}

/* Ends a child: its failure on stdout, its verdict as the exit status. */
static void __attribute__((noreturn)) child_exit(int ret, const char *who)
{
	if (ret)
		printf("tessera-check: %s FAIL: %s\n", who, why);
	fflush(stdout);
	_exit(ret ? 1 : 0);
}

/* The parent's result `ret`, and then the child's: a failed parent kills the child first. */
static int join_child(pid_t pid, int ret, const char *who)
{
	if (!ret)
		return child_verdict(pid, who);
	kill(pid, SIGKILL);
	child_verdict(pid, who);
	return ret;
}

/*
 * One side of `isolate`: a buffer at the start of this context's address space, filled with
 * its own pattern while the other side does the same at the same GPU address; then rounds of
 * CRC-32 over it and a CPU read-back. The parent side also makes a buffer with raw ioctls
 * whose GPU address and mmap offset the child must not reach.
 */
static int isolate_side(int me_to, int from_other, uint32_t pattern, int parent)
{
	const size_t len = 64 << 10;
	tessera_dev *d = open_dev();
	tessera_bo *mine = NULL, *out = NULL;
	struct raw_bo extra = { 0 };
	uint64_t other_va, other_offset;
	int ret = d ? 0 : -1;

	if (!ret)
		ret = bo(d, len, TESSERA_BO_VRAM, &mine) ?: bo(d, 4096, TESSERA_BO_VRAM, &out);
	if (!ret && parent)
		ret = raw_bo(d, len, &extra);
	if (ret)
		return ret;
	send_u64(me_to, tessera_bo_va(mine));
	send_u64(me_to, extra.va);
	send_u64(me_to, extra.mmap_offset);
	if (recv_u64(from_other) != tessera_bo_va(mine))
		return failf("isolate: the two contexts put their first buffer at different GPU addresses");
	other_va = recv_u64(from_other);
	other_offset = recv_u64(from_other);

	ret = run(d, tessera_pkt_fill(tessera_bo_va(mine), len, pattern), "isolate: fill");
	send_u64(me_to, 1); /* filled: both sides now work at once */
	recv_u64(from_other);
	for (int round = 0; !ret && round < 8; round++) {
		const uint32_t *cpu = tessera_bo_cpu(mine);

		for (size_t i = 0; !ret && i < len / 4; i++)
			if (cpu[i] != pattern)
				ret = failf("isolate: word %zu is %#x, not this context's %#x", i,
					    cpu[i], pattern);
		if (!ret)
			ret = crc_of(d, mine, out, len, "isolate: crc32");
	}
	if (!ret && other_va) {
		/* The other side's buffer address is not mapped in this context. */
		struct tvgpu_packet p = tessera_pkt_copy(other_va, tessera_bo_va(out), 4);
		struct tvgpu_ctx_state st;
		int err = tessera_run(d, &p, 1, 10LL * 1000 * 1000 * 1000);

		tessera_ctx_state(d, &st);
		if (err != -EIO || st.fault_code != TVGPU_FAULT_NOT_PRESENT ||
		    st.fault_addr != other_va)
			ret = failf("isolate: reading the other context's address %#llx gave %d "
				    "(%s at %#llx), expected EIO (NOT_PRESENT there)",
				    (unsigned long long)other_va, err,
				    tessera_fault_name(st.fault_code),
				    (unsigned long long)st.fault_addr);
		else
			ret = tessera_recover(d);
	}
	if (!ret && other_offset) {
		/* Its mmap offset names no buffer of this file. */
		void *m = mmap(NULL, 4096, PROT_READ, MAP_SHARED, tessera_fd(d), other_offset);

		if (m != MAP_FAILED)
			ret = failf("isolate: mmap of the other file's buffer offset worked");
	}
	tessera_bo_destroy(mine);
	tessera_bo_destroy(out);
	tessera_close(d);
	return ret;
}

static int isolate(void)
{
	struct chan c;
	pid_t pid;
	int ret;

	pid = fork_with_chan(&c);
	if (pid < 0)
		return -1;
	if (pid == 0)
		child_exit(isolate_side(c.to_parent[1], c.to_child[0], 0x22222222U, 0),
			   "isolate (child)");
	ret = isolate_side(c.to_child[1], c.to_parent[0], 0x11111111U, 1);
	return join_child(pid, ret, "the child");
}

/*
 * `fault`: the child runs rounds of CRC-32 jobs; once it has started, the parent submits a
 * read of an unmapped address, gets EIO and the fault, recovers and runs a job. The child
 * must finish every round.
 */
static int fault_beside(void)
{
	const size_t len = 256 << 10, rounds = 24;
	struct chan c;
	pid_t pid;
	int ret;

	pid = fork_with_chan(&c);
	if (pid < 0)
		return -1;
	if (pid == 0) {
		tessera_dev *d = open_dev();
		tessera_bo *src = NULL, *out = NULL;

		ret = d ? 0 : -1;
		if (!ret)
			ret = bo(d, len, TESSERA_BO_VRAM, &src) ?: bo(d, 4, TESSERA_BO_VRAM, &out);
		if (!ret)
			xorshift(9, tessera_bo_cpu(src), len / 4);
		for (size_t i = 0; !ret && i < rounds; i++) {
			ret = crc_of(d, src, out, len, "fault (neighbour): crc32");
			if (i == 0)
				send_u64(c.to_parent[1], 1);
		}
		child_exit(ret, "fault (neighbour)");
	}
	{
		tessera_dev *d = open_dev();
		tessera_bo *out = NULL;
		struct tvgpu_ctx_state st;
		uint64_t bad;
		int err;

		ret = d ? 0 : -1;
		if (!ret)
			ret = bo(d, 4096, TESSERA_BO_VRAM, &out);
		if (!ret) {
			struct tvgpu_packet p;

			recv_u64(c.to_parent[0]); /* the neighbour is working */
			bad = tessera_bo_va(out) + (1ULL << 30);
			p = tessera_pkt_copy(bad, tessera_bo_va(out), 64);
			err = tessera_run(d, &p, 1, 10LL * 1000 * 1000 * 1000);
			tessera_ctx_state(d, &st);
			if (err != -EIO || !(st.flags & TVGPU_STATE_FAULTED) ||
			    st.fault_code != TVGPU_FAULT_NOT_PRESENT || st.fault_addr != bad)
				ret = failf("fault: a read of %#llx gave %d (%s at %#llx), expected "
					    "EIO with NOT_PRESENT there",
					    (unsigned long long)bad, err,
					    tessera_fault_name(st.fault_code),
					    (unsigned long long)st.fault_addr);
		}
		if (!ret) {
			err = tessera_recover(d);
			ret = err ? failf("fault: recover: %s", strerror(-err)) :
				    run(d, tessera_pkt_fill(tessera_bo_va(out), 4096, 7),
					"fault: a job after recovery");
		}
		if (d) {
			tessera_bo_destroy(out);
			tessera_close(d);
		}
	}
	return join_child(pid, ret, "the neighbour");
}

/*
 * A child that submits four packets of 800 ms of GPU time (each well inside the watchdog's
 * budget; on two engines the job takes 1.6 s, and the driver's release waits up to 5 s for work
 * in flight before it gives up on it), checks that they have not completed, and raises
 * SIGKILL; its wait status in *status.
 */
static int submit_and_die(int *status)
{
	pid_t pid = fork();

	if (pid < 0)
		return failf("fork: %s", strerror(errno));
	if (pid == 0) {
		struct tvgpu_packet p[4];
		struct tvgpu_ctx_state st;
		tessera_dev *cd = open_dev();
		uint64_t seqno;

		for (int i = 0; i < 4; i++)
			p[i] = tessera_pkt_spin(200000, 4);
		if (!cd || tessera_submit(cd, p, 4, &seqno) || tessera_ctx_state(cd, &st))
			_exit(1);
		if (st.completed >= seqno)
			_exit(4); /* done already: not killed in the middle */
		raise(SIGKILL);
		_exit(5);
	}
	if (waitpid(pid, status, 0) != pid)
		return failf("kill: waitpid: %s", strerror(errno));
	return 0;
}

/*
 * `kill`: the child submits a long job (SPIN_US, 2 s of GPU time), checks that it has not
 * completed and dies of SIGKILL at once (raise: no scheduling race between two processes
 * decides whether the job is still running). Then a new context runs a job, and the killed
 * one's context is no longer in use.
 */
static int kill_mid_job(void)
{
	struct tvgpu_info before, after;
	tessera_dev *d;
	double t0, exit_ms;
	int ret, status;

	d = open_dev();
	if (!d)
		return -1;
	if (tessera_info(d, &before)) {
		tessera_close(d);
		return failf("kill: TVGPU_IOCTL_INFO: %s", strerror(errno));
	}
	tessera_close(d);
	/*
	 * A guest starved of CPU by its host can see the whole job end between two of its
	 * system calls; the child then exits 4 instead of dying, and the attempt is repeated.
	 */
	for (int attempt = 1;; attempt++) {
		t0 = now_ms();
		if (submit_and_die(&status))
			return -1;
		if (WIFEXITED(status) && WEXITSTATUS(status) == 4 && attempt < 5)
			continue;
		/*
		 * Five times the job ended before its process could die: the host starves this
		 * guest. The rest still holds for a process that exited with its work done: the
		 * device runs the next job and the context is released.
		 */
		if (WIFEXITED(status) && WEXITSTATUS(status) == 4) {
			printf("tessera-check: kill: the job ended before the kill five times (a starved "
			       "guest); checking the device after a plain exit instead\n");
			break;
		}
		if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGKILL)
			return failf("kill: the child did not die of SIGKILL in the middle of its "
				     "job (%s %d, attempt %d)",
				     WIFEXITED(status) ? "status" : "signal",
				     WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status),
				     attempt);
		break;
	}
	/* The killed process's exit waited for its work in flight (the driver's release). */
	exit_ms = now_ms() - t0;
	t0 = now_ms();
	d = open_dev();
	if (!d)
		return -1;
	{
		tessera_bo *src = NULL, *out = NULL;

		ret = bo(d, 64 << 10, TESSERA_BO_VRAM, &src) ?: bo(d, 4, TESSERA_BO_VRAM, &out);
		if (!ret) {
			xorshift(10, tessera_bo_cpu(src), (64 << 10) / 4);
			ret = crc_of(d, src, out, 64 << 10, "kill: a job after the kill");
		}
		tessera_bo_destroy(src);
		tessera_bo_destroy(out);
	}
	if (!ret && tessera_info(d, &after))
		ret = failf("kill: TVGPU_IOCTL_INFO: %s", strerror(errno));
	/* This file holds one context now; the killed process's one is gone. */
	if (!ret && after.contexts_in_use != before.contexts_in_use + 1)
		ret = failf("kill: %u contexts in use after the kill, %u before (plus this one)",
			    after.contexts_in_use, before.contexts_in_use);
	tessera_close(d);
	if (!ret)
		snprintf(why, sizeof(why),
			 "the killed process was gone after %.0f ms; the next job ran %.0f ms later",
			 exit_ms, now_ms() - t0);
	return ret;
}

static const struct {
	const char *name;
	int (*fn)(void);
} tests[] = {
	{ "jobs", jobs_vram },	 { "sysmem", jobs_sysmem }, { "isolate", isolate },
	{ "fault", fault_beside }, { "kill", kill_mid_job },
};
#define NTESTS (sizeof(tests) / sizeof(tests[0]))

static int run_test(size_t i)
{
	double t0 = now_ms();
	int ret;

	why[0] = 0;
	ret = tests[i].fn();
	if (ret)
		printf("tessera-check: %s FAIL: %s\n", tests[i].name, why);
	else
		printf("tessera-check: %s ok (%.0f ms%s%s)\n", tests[i].name, now_ms() - t0,
		       why[0] ? "; " : "", why);
	fflush(stdout);
	return ret;
}

static void usage(FILE *to)
{
	fprintf(to, "usage: tessera-check [-d N] [jobs|sysmem|isolate|fault|kill|all]...\n"
		    "Checks libtessera and the tessera_vgpu driver on /dev/tessera/vgpuN (default 0).\n");
}

int main(int argc, char **argv)
{
	int failed = 0, ran = 0, i = 1;

	if (argc > 1 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
		usage(stdout);
		return 0;
	}
	if (argc > 2 && !strcmp(argv[1], "-d")) {
		char *end;

		dev_index = (int)strtol(argv[2], &end, 10);
		if (*end || dev_index < 0) {
			usage(stderr);
			return 2;
		}
		i = 3;
	}
	for (; i < argc; i++) {
		size_t t;
		int all = !strcmp(argv[i], "all");

		for (t = 0; t < NTESTS; t++) {
			if (all || !strcmp(argv[i], tests[t].name)) {
				failed |= run_test(t) != 0;
				ran = 1;
				if (!all)
					break;
			}
		}
		if (!all && t == NTESTS) {
			fprintf(stderr, "tessera-check: unknown test '%s'\n", argv[i]);
			usage(stderr);
			return 2;
		}
	}
	if (!ran)
		for (size_t t = 0; t < NTESTS; t++)
			failed |= run_test(t) != 0;
	return failed;
}
