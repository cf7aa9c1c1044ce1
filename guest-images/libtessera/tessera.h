/* SPDX-License-Identifier: Apache-2.0 OR MIT */
/*
 * libtessera: the guest user-mode library of the Tessera vGPU, over the ioctls of the
 * tessera_vgpu driver (tessera_vgpu_ioctl.h). C ABI; libtessera.a and libtessera.so.
 *
 *   tessera_dev *d = tessera_open(0);               // /dev/tessera/vgpu0, one GPU context
 *   tessera_bo *x;
 *   tessera_bo_create(d, 1 << 20, TESSERA_BO_VRAM, &x);   // CPU-mapped and GPU-mapped
 *   memcpy(tessera_bo_cpu(x), data, n);
 *   struct tvgpu_packet p = tessera_pkt_crc32(n, tessera_bo_va(x), tessera_bo_va(x) + n);
 *   tessera_run(d, &p, 1, -1);                      // submit + wait
 *
 * Functions returning int return 0 or a negative errno (-EIO: the context stopped on a
 * fault; tessera_ctx_state() tells which, tessera_recover() restarts it).
 */
#ifndef TESSERA_H
#define TESSERA_H

#include <stddef.h>
#include <stdint.h>

#include "tessera_vgpu_ioctl.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tessera_dev tessera_dev;
typedef struct tessera_bo tessera_bo;

/* Buffer object placement. */
#define TESSERA_BO_VRAM		TVGPU_BO_VRAM
#define TESSERA_BO_SYSMEM	TVGPU_BO_SYSMEM
/* Map the buffer read-only for the GPU. */
#define TESSERA_BO_GPU_READONLY	0x100U

/*
 * The device a program uses: TESSERA_DEVICE when it is set, else /dev/tessera/vgpuN. It
 * names a device node (in a VM, over the guest driver), unix:PATH (an instance's session
 * socket: a host process or a container) or tls://HOST:PORT/INSTANCE (a remote server, with
 * the certificates TESSERA_TLS_DIR holds: ca.pem, client.pem, client-key.pem). Sessions
 * need a libtessera built with its session transports (SESSION_LIB=; see the Makefile).
 * Over a session, a buffer's CPU mapping is shared with the GPU for system memory on a UNIX
 * socket; otherwise it is a copy the library keeps coherent at submit (what the packets
 * read is sent) and at a completed wait (what they wrote is brought back).
 */

/* Number of vGPUs (/dev/tessera/vgpu0 .. N-1 that exist; 1 when TESSERA_DEVICE is set). */
int tessera_count(void);
/* Opens vGPU `index` (TESSERA_DEVICE: only 0); NULL with errno set on failure. */
tessera_dev *tessera_open(int index);
/* Opens a device by address: a device node path, unix:PATH or tls://HOST:PORT/INSTANCE. */
tessera_dev *tessera_open_path(const char *path);
/* Why the last failed call of this thread failed, in words ("" if none did). */
const char *tessera_last_error(void);
/* Closes it: its context and every buffer object still alive go away. */
void tessera_close(tessera_dev *dev);
/* The file descriptor (for poll-free raw ioctls); -1 for a session. */
int tessera_fd(const tessera_dev *dev);

int tessera_info(tessera_dev *dev, struct tvgpu_info *info);

/*
 * A buffer object of `size` bytes (rounded up to pages): TESSERA_BO_VRAM or
 * TESSERA_BO_SYSMEM, optionally | TESSERA_BO_GPU_READONLY. It is mapped for the CPU
 * (tessera_bo_cpu) and at a GPU virtual address of the device's context (tessera_bo_va).
 */
int tessera_bo_create(tessera_dev *dev, uint64_t size, uint32_t flags, tessera_bo **bo);
void tessera_bo_destroy(tessera_bo *bo);
void *tessera_bo_cpu(const tessera_bo *bo);
uint64_t tessera_bo_va(const tessera_bo *bo);
uint64_t tessera_bo_size(const tessera_bo *bo);

/* Submits packets (no TVGPU_OP_FENCE: the driver adds one); *seqno identifies the batch. */
int tessera_submit(tessera_dev *dev, const struct tvgpu_packet *packets, uint32_t count,
		   uint64_t *seqno);
/* Waits for a batch: 0, -ETIME, -EIO (fault), -ECANCELED, -EINTR. timeout_ns < 0: forever. */
int tessera_wait(tessera_dev *dev, uint64_t seqno, int64_t timeout_ns);
/* Submit and wait. */
int tessera_run(tessera_dev *dev, const struct tvgpu_packet *packets, uint32_t count,
		int64_t timeout_ns);
int tessera_ctx_state(tessera_dev *dev, struct tvgpu_ctx_state *state);
/* Restarts the context after a fault (work not yet done is dropped). */
int tessera_recover(tessera_dev *dev);

/* A readable name of a TVGPU_FAULT_* code. */
const char *tessera_fault_name(uint32_t code);

/* Packet builders (see tessera_vgpu.h for the arguments). */
struct tvgpu_packet tessera_pkt_nop(void);
struct tvgpu_packet tessera_pkt_copy(uint64_t src_va, uint64_t dst_va, uint64_t len);
struct tvgpu_packet tessera_pkt_fill(uint64_t dst_va, uint64_t len, uint32_t pattern);
struct tvgpu_packet tessera_pkt_timestamp(uint64_t va);
struct tvgpu_packet tessera_pkt_saxpy(uint64_t n, float a, uint64_t x_va, uint64_t y_va);
struct tvgpu_packet tessera_pkt_sgemm(uint64_t m, uint64_t n, uint64_t k, uint64_t a_va,
				      uint64_t b_va, uint64_t c_va);
struct tvgpu_packet tessera_pkt_reduce_sum(uint64_t n, uint64_t x_va, uint64_t out_va);
struct tvgpu_packet tessera_pkt_crc32(uint64_t len, uint64_t src_va, uint64_t out_va);
struct tvgpu_packet tessera_pkt_spin(uint64_t us, uint64_t groups);

#ifdef __cplusplus
}
#endif

#endif /* TESSERA_H */
