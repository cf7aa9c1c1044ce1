/* SPDX-License-Identifier: Apache-2.0 OR MIT */
/* libtessera: see tessera.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tessera.h"

#define TESSERA_EXPORT __attribute__((visibility("default")))

struct tessera__sess;

struct tessera_dev {
	int fd;			/* the device node, or -1 for a session */
	struct tessera__sess *sess;
};

#ifdef TESSERA_SESSIONS
/* The session transports (vgpu/capi, a Rust static library linked in: SESSION_LIB=). */
struct tessera__sess *tessera__sess_open(const char *addr);
void tessera__sess_close(struct tessera__sess *s);
const char *tessera__sess_error(void);
int tessera__sess_info(struct tessera__sess *s, uint64_t *vram_size, uint64_t *vram_free,
		       uint32_t *contexts, uint32_t *max_packets, uint32_t *kernels,
		       uint32_t *version);
int tessera__sess_bo_create(struct tessera__sess *s, uint64_t size, uint32_t flags,
			    uint64_t *va, void **cpu, uint64_t *size_out);
void tessera__sess_bo_destroy(struct tessera__sess *s, uint64_t va);
int tessera__sess_submit(struct tessera__sess *s, const void *packets, uint32_t count,
			 uint64_t *seqno);
int tessera__sess_wait(struct tessera__sess *s, uint64_t seqno, int64_t timeout_ns);
int tessera__sess_state(struct tessera__sess *s, uint32_t *faulted, uint32_t *code,
			uint32_t *faults, uint64_t *addr, uint64_t *submitted,
			uint64_t *completed);
int tessera__sess_recover(struct tessera__sess *s);
#endif

static __thread char last_error[256];

static int failed(int err, const char *what)
{
	snprintf(last_error, sizeof(last_error), "%s: %s", what, strerror(-err));
	return err;
}

#ifdef TESSERA_SESSIONS
/* A session call's result; its reason is kept for tessera_last_error(). */
static int sess_result(int err)
{
	if (err)
		snprintf(last_error, sizeof(last_error), "%s", tessera__sess_error());
	return err;
}
#endif

/* Whether `addr` names a session (unix:PATH, tls://HOST:PORT/INSTANCE), not a device node. */
static int is_session(const char *addr)
{
	return !strncmp(addr, "unix:", 5) || !strncmp(addr, "tls://", 6);
}

/* TESSERA_DEVICE, when set and not empty. */
static const char *device_env(void)
{
	const char *e = getenv("TESSERA_DEVICE");

	return e && *e ? e : NULL;
}

struct tessera_bo {
	tessera_dev *dev;
	uint32_t handle;
	uint64_t size;
	uint64_t va;
	void *cpu;
};

static int neg_errno(void)
{
	return errno ? -errno : -EIO;
}

static int xioctl(tessera_dev *dev, unsigned long req, void *arg)
{
	int r;

	do {
		r = ioctl(dev->fd, req, arg);
	} while (r < 0 && errno == EINTR && req != TVGPU_IOCTL_WAIT);
	return r < 0 ? neg_errno() : 0;
}

TESSERA_EXPORT const char *tessera_last_error(void)
{
	return last_error;
}

TESSERA_EXPORT int tessera_count(void)
{
	char path[64];
	struct stat st;
	int n = 0;

	if (device_env())
		return 1;

	for (;;) {
		snprintf(path, sizeof(path), TVGPU_DEV_DIR "/vgpu%d", n);
		if (stat(path, &st) != 0 || !S_ISCHR(st.st_mode))
			return n;
		n++;
	}
}

TESSERA_EXPORT tessera_dev *tessera_open_path(const char *path)
{
	tessera_dev *dev = calloc(1, sizeof(*dev));
	int e;

	if (!dev)
		return NULL;
	dev->fd = -1;
	if (is_session(path)) {
#ifdef TESSERA_SESSIONS
		dev->sess = tessera__sess_open(path);
		if (dev->sess)
			return dev;
		e = errno;
		snprintf(last_error, sizeof(last_error), "%s: %s", path, tessera__sess_error());
#else
		e = EPROTONOSUPPORT;
		snprintf(last_error, sizeof(last_error),
			 "%s: this libtessera was built without session transports", path);
#endif
		free(dev);
		errno = e;
		return NULL;
	}
	dev->fd = open(path, O_RDWR | O_CLOEXEC);
	if (dev->fd < 0) {
		e = errno;
		snprintf(last_error, sizeof(last_error), "%s: %s", path, strerror(e));
		free(dev);
		errno = e;
		return NULL;
	}
	return dev;
}

TESSERA_EXPORT tessera_dev *tessera_open(int index)
{
	const char *env = device_env();
	char path[64];

	if (env) {
		/* TESSERA_DEVICE names the one device this program uses. */
		if (index != 0) {
			snprintf(last_error, sizeof(last_error),
				 "TESSERA_DEVICE names one device; there is no device %d", index);
			errno = ENODEV;
			return NULL;
		}
		return tessera_open_path(env);
	}
	snprintf(path, sizeof(path), TVGPU_DEV_DIR "/vgpu%d", index);
	return tessera_open_path(path);
}

TESSERA_EXPORT void tessera_close(tessera_dev *dev)
{
	if (!dev)
		return;
#ifdef TESSERA_SESSIONS
	if (dev->sess)
		tessera__sess_close(dev->sess);
#endif
	if (dev->fd >= 0)
		close(dev->fd);
	free(dev);
}

TESSERA_EXPORT int tessera_fd(const tessera_dev *dev)
{
	return dev->fd;
}

TESSERA_EXPORT int tessera_info(tessera_dev *dev, struct tvgpu_info *info)
{
	memset(info, 0, sizeof(*info));
#ifdef TESSERA_SESSIONS
	if (dev->sess) {
		uint64_t size = 0, free_bytes = 0;
		uint32_t contexts = 0, packets = 0, kernels = 0, version = 0;
		int err = tessera__sess_info(dev->sess, &size, &free_bytes, &contexts, &packets,
					     &kernels, &version);

		info->ioctl_version = TVGPU_IOCTL_VERSION;
		info->vram_size = size;
		info->vram_free = free_bytes;
		info->num_contexts = contexts;
		info->contexts_in_use = 1;	/* this session's */
		/* A submission holds at most ring_entries - 1 packets. */
		info->ring_entries = packets + 1;
		info->kernels = kernels;
		info->abi_version = version;
		return sess_result(err);
	}
#endif
	return xioctl(dev, TVGPU_IOCTL_INFO, info);
}

TESSERA_EXPORT int tessera_bo_create(tessera_dev *dev, uint64_t size, uint32_t flags,
				     tessera_bo **out)
{
	struct tvgpu_bo_create req = { .size = size, .flags = flags & TESSERA_BO_SYSMEM };
	struct tvgpu_bo_destroy del = { 0 };
	struct tvgpu_map map = { 0 };
	tessera_bo *bo;
	int err;

	*out = NULL;
	if (flags & ~(TESSERA_BO_SYSMEM | TESSERA_BO_GPU_READONLY))
		return failed(-EINVAL, "buffer flags");
	bo = calloc(1, sizeof(*bo));
	if (!bo)
		return -ENOMEM;
#ifdef TESSERA_SESSIONS
	if (dev->sess) {
		bo->dev = dev;
		err = sess_result(tessera__sess_bo_create(dev->sess, size, flags, &bo->va,
							  &bo->cpu, &bo->size));
		if (err) {
			free(bo);
			return err;
		}
		*out = bo;
		return 0;
	}
#endif
	err = xioctl(dev, TVGPU_IOCTL_BO_CREATE, &req);
	if (err) {
		free(bo);
		return err;
	}
	bo->dev = dev;
	bo->handle = req.handle;
	bo->size = req.size;
	bo->cpu = mmap(NULL, req.size, PROT_READ | PROT_WRITE, MAP_SHARED, dev->fd,
		       (off_t)req.mmap_offset);
	if (bo->cpu == MAP_FAILED) {
		err = neg_errno();
		goto destroy;
	}
	map.handle = req.handle;
	map.flags = flags & TESSERA_BO_GPU_READONLY ? TVGPU_MAP_READONLY : 0;
	map.size = req.size;
	err = xioctl(dev, TVGPU_IOCTL_MAP, &map);
	if (err)
		goto unmap;
	bo->va = map.va;
	*out = bo;
	return 0;
unmap:
	munmap(bo->cpu, bo->size);
destroy:
	del.handle = req.handle;
	xioctl(dev, TVGPU_IOCTL_BO_DESTROY, &del);
	free(bo);
	return err;
}

TESSERA_EXPORT void tessera_bo_destroy(tessera_bo *bo)
{
	struct tvgpu_unmap unmap;
	struct tvgpu_bo_destroy del = { 0 };

	if (!bo)
		return;
#ifdef TESSERA_SESSIONS
	if (bo->dev->sess) {
		tessera__sess_bo_destroy(bo->dev->sess, bo->va);
		free(bo);
		return;
	}
#endif
	unmap.va = bo->va;
	xioctl(bo->dev, TVGPU_IOCTL_UNMAP, &unmap);
	munmap(bo->cpu, bo->size);
	del.handle = bo->handle;
	xioctl(bo->dev, TVGPU_IOCTL_BO_DESTROY, &del);
	free(bo);
}

TESSERA_EXPORT void *tessera_bo_cpu(const tessera_bo *bo)
{
	return bo->cpu;
}

TESSERA_EXPORT uint64_t tessera_bo_va(const tessera_bo *bo)
{
	return bo->va;
}

TESSERA_EXPORT uint64_t tessera_bo_size(const tessera_bo *bo)
{
	return bo->size;
}

TESSERA_EXPORT int tessera_submit(tessera_dev *dev, const struct tvgpu_packet *packets,
				  uint32_t count, uint64_t *seqno)
{
	struct tvgpu_submit req = {
		.packets = (uint64_t)(uintptr_t)packets,
		.count = count,
	};
	int err;

#ifdef TESSERA_SESSIONS
	if (dev->sess)
		return sess_result(tessera__sess_submit(dev->sess, packets, count, seqno));
#endif
	err = xioctl(dev, TVGPU_IOCTL_SUBMIT, &req);
	if (!err && seqno)
		*seqno = req.seqno;
	return err;
}

TESSERA_EXPORT int tessera_wait(tessera_dev *dev, uint64_t seqno, int64_t timeout_ns)
{
	struct tvgpu_wait req = { .seqno = seqno, .timeout_ns = timeout_ns };

#ifdef TESSERA_SESSIONS
	if (dev->sess)
		return sess_result(tessera__sess_wait(dev->sess, seqno, timeout_ns));
#endif
	return xioctl(dev, TVGPU_IOCTL_WAIT, &req);
}

TESSERA_EXPORT int tessera_run(tessera_dev *dev, const struct tvgpu_packet *packets,
			       uint32_t count, int64_t timeout_ns)
{
	uint64_t seqno;
	int err = tessera_submit(dev, packets, count, &seqno);

	return err ? err : tessera_wait(dev, seqno, timeout_ns);
}

TESSERA_EXPORT int tessera_ctx_state(tessera_dev *dev, struct tvgpu_ctx_state *state)
{
	memset(state, 0, sizeof(*state));
#ifdef TESSERA_SESSIONS
	if (dev->sess) {
		uint32_t faulted = 0, code = 0, faults = 0;
		uint64_t addr = 0, submitted = 0, completed = 0;
		int err = tessera__sess_state(dev->sess, &faulted, &code, &faults, &addr,
					      &submitted, &completed);

		state->flags = faulted ? TVGPU_STATE_FAULTED : 0;
		state->fault_code = code;
		state->faults = faults;
		state->fault_addr = addr;
		state->submitted = submitted;
		state->completed = completed;
		return sess_result(err);
	}
#endif
	return xioctl(dev, TVGPU_IOCTL_CTX_STATE, state);
}

TESSERA_EXPORT int tessera_recover(tessera_dev *dev)
{
#ifdef TESSERA_SESSIONS
	if (dev->sess)
		return sess_result(tessera__sess_recover(dev->sess));
#endif
	return xioctl(dev, TVGPU_IOCTL_RECOVER, NULL);
}

TESSERA_EXPORT const char *tessera_fault_name(uint32_t code)
{
	static const char *const names[] = {
		[TVGPU_FAULT_NONE] = "none",
		[TVGPU_FAULT_NOT_PRESENT] = "not present",
		[TVGPU_FAULT_WRITE_PROTECT] = "write protect",
		[TVGPU_FAULT_VRAM_RANGE] = "VRAM range",
		[TVGPU_FAULT_DMA_DOMAIN] = "DMA domain",
		[TVGPU_FAULT_BAD_OPCODE] = "bad opcode",
		[TVGPU_FAULT_BAD_PACKET] = "bad packet",
		[TVGPU_FAULT_RING_CONFIG] = "ring config",
		[TVGPU_FAULT_BAD_ROOT] = "bad root",
		[TVGPU_FAULT_BAD_PTE] = "bad PTE",
		[TVGPU_FAULT_VA_RANGE] = "VA range",
		[TVGPU_FAULT_TIMEOUT] = "timeout",
	};

	if (code < sizeof(names) / sizeof(names[0]) && names[code])
		return names[code];
	return "unknown";
}

static struct tvgpu_packet pkt(uint32_t op, uint32_t flags, uint64_t a0, uint64_t a1,
			       uint64_t a2)
{
	struct tvgpu_packet p;

	memset(&p, 0, sizeof(p));
	p.opcode = op;
	p.flags = flags;
	p.args[0] = a0;
	p.args[1] = a1;
	p.args[2] = a2;
	return p;
}

TESSERA_EXPORT struct tvgpu_packet tessera_pkt_nop(void)
{
	return pkt(TVGPU_OP_NOP, 0, 0, 0, 0);
}

TESSERA_EXPORT struct tvgpu_packet tessera_pkt_copy(uint64_t src_va, uint64_t dst_va,
						    uint64_t len)
{
	return pkt(TVGPU_OP_COPY, 0, src_va, dst_va, len);
}

TESSERA_EXPORT struct tvgpu_packet tessera_pkt_fill(uint64_t dst_va, uint64_t len,
						    uint32_t pattern)
{
	return pkt(TVGPU_OP_FILL, 0, dst_va, len, pattern);
}

TESSERA_EXPORT struct tvgpu_packet tessera_pkt_timestamp(uint64_t va)
{
	return pkt(TVGPU_OP_TIMESTAMP, 0, va, 0, 0);
}

TESSERA_EXPORT struct tvgpu_packet tessera_pkt_saxpy(uint64_t n, float a, uint64_t x_va,
						     uint64_t y_va)
{
	uint32_t bits;
	struct tvgpu_packet p;

	memcpy(&bits, &a, sizeof(bits));
	p = pkt(TVGPU_OP_DISPATCH, TVGPU_KERNEL_SAXPY, n, bits, x_va);
	p.args[3] = y_va;
	return p;
}

TESSERA_EXPORT struct tvgpu_packet tessera_pkt_sgemm(uint64_t m, uint64_t n, uint64_t k,
						     uint64_t a_va, uint64_t b_va, uint64_t c_va)
{
	struct tvgpu_packet p = pkt(TVGPU_OP_DISPATCH, TVGPU_KERNEL_SGEMM, m, n, k);

	p.args[3] = a_va;
	p.args[4] = b_va;
	p.args[5] = c_va;
	return p;
}

TESSERA_EXPORT struct tvgpu_packet tessera_pkt_reduce_sum(uint64_t n, uint64_t x_va,
							  uint64_t out_va)
{
	return pkt(TVGPU_OP_DISPATCH, TVGPU_KERNEL_REDUCE_SUM, n, x_va, out_va);
}

TESSERA_EXPORT struct tvgpu_packet tessera_pkt_crc32(uint64_t len, uint64_t src_va,
						     uint64_t out_va)
{
	return pkt(TVGPU_OP_DISPATCH, TVGPU_KERNEL_CRC32, len, src_va, out_va);
}

TESSERA_EXPORT struct tvgpu_packet tessera_pkt_spin(uint64_t us, uint64_t groups)
{
	return pkt(TVGPU_OP_DISPATCH, TVGPU_KERNEL_SPIN_US, us, groups, 0);
}
