/* SPDX-License-Identifier: (GPL-2.0-only WITH Linux-syscall-note) OR MIT */
/*
 * Tessera vGPU: the ioctl interface of the tessera_vgpu Linux driver, shared by the driver,
 * libtessera and the guest tools. The device contract itself (registers, packets, fault
 * codes) is tessera_vgpu.h, generated from vgpu/abi; this header only adds the driver's
 * interface on top of it and never repeats a device constant.
 *
 * One character device per vGPU: /dev/tessera/vgpu0, vgpu1, ...
 * Each open file is one GPU context with its own GPU virtual address space (own page tables),
 * created on first use (TVGPU_IOCTL_INFO and buffer objects do not need one).
 *
 *   fd = open("/dev/tessera/vgpu0", O_RDWR);
 *   TVGPU_IOCTL_BO_CREATE   buffer object in VRAM or system memory -> handle, mmap offset
 *   mmap(fd, offset)        CPU access (VRAM through the BAR2 aperture, write-combined)
 *   TVGPU_IOCTL_MAP         map (part of) a buffer object at a GPU virtual address
 *   TVGPU_IOCTL_SUBMIT      packets into the context's ring, followed by a fence -> seqno
 *   TVGPU_IOCTL_WAIT        wait for a seqno (timeout, interruptible)
 *   TVGPU_IOCTL_CTX_STATE   fault reporting: code and address of the fault that stopped it
 *   TVGPU_IOCTL_RECOVER     restart a faulted context (work not yet done is dropped)
 */
#ifndef TESSERA_VGPU_IOCTL_H
#define TESSERA_VGPU_IOCTL_H

#include <linux/ioctl.h>
#include <linux/types.h>

#include "tessera_vgpu.h"

/* Bumped on incompatible changes of the structures below. */
#define TVGPU_IOCTL_VERSION		1
/* Directory of the device nodes; the nodes are named vgpu<N>. */
#define TVGPU_DEV_DIR			"/dev/tessera"
/* ioctl type: 0xB9 is unassigned in Documentation/userspace-api/ioctl/ioctl-number.rst. */
#define TVGPU_IOCTL_TYPE		0xB9

/*
 * GPU virtual addresses user space may map: [TVGPU_VA_USER_START, TVGPU_VA_USER_END).
 * Below TVGPU_VA_USER_START the driver keeps the context's ring and fence page.
 */
#define TVGPU_VA_USER_START		(1ULL << 32)
#define TVGPU_VA_USER_END		(1ULL << 47)

/* TVGPU_IOCTL_INFO: the device and this file's context. */
struct tvgpu_info {
	__u32 ioctl_version;	/* TVGPU_IOCTL_VERSION of the driver */
	__u32 abi_version;	/* the VERSION register: major << 16 | minor */
	__u32 caps;		/* TVGPU_CAP_* */
	__u32 num_contexts;	/* contexts of the device */
	__u32 contexts_in_use;	/* of those, open by some file (or the driver) */
	__u32 kernels;		/* bitmap of TVGPU_KERNEL_* (the KERNELS register) */
	__u64 vram_size;	/* bytes */
	__u64 vram_free;	/* bytes not held by buffer objects or page tables */
	__u32 ring_entries;	/* packets per ring; a submission holds at most ring_entries - 1 */
	__u32 msix_vectors;	/* MSI-X vectors the driver got */
	__u32 fault_count;	/* the FAULT_COUNT register: faults since the last reset */
	__u32 ctx_id;		/* this file's context, or TVGPU_NO_CONTEXT */
	__u32 pci_domain;
	__u32 pci_bus;
	__u32 pci_devfn;
	__u32 subsystem_id;	/* the vGPU profile number */
	__u64 va_start;		/* TVGPU_VA_USER_START */
	__u64 va_end;		/* TVGPU_VA_USER_END */
};
#define TVGPU_NO_CONTEXT		0xffffffffU

/* TVGPU_IOCTL_BO_CREATE: a buffer object. The size is rounded up to whole pages. */
#define TVGPU_BO_VRAM			0x0U	/* in this vGPU's VRAM */
#define TVGPU_BO_SYSMEM			0x1U	/* in guest RAM (DMA-coherent pages) */
struct tvgpu_bo_create {
	__u64 size;		/* in: bytes (> 0) */
	__u32 flags;		/* in: TVGPU_BO_VRAM or TVGPU_BO_SYSMEM */
	__u32 handle;		/* out: > 0 */
	__u64 mmap_offset;	/* out: the offset to mmap() it at */
};

/* TVGPU_IOCTL_BO_DESTROY: drop the handle. GPU mappings and mmap()s keep the memory alive. */
struct tvgpu_bo_destroy {
	__u32 handle;
	__u32 pad;
};

/* TVGPU_IOCTL_MAP: map [bo_offset, bo_offset + size) of a buffer object at a GPU VA. */
#define TVGPU_MAP_READONLY		0x1U
struct tvgpu_map {
	__u32 handle;
	__u32 flags;		/* TVGPU_MAP_* */
	__u64 bo_offset;	/* page-aligned */
	__u64 size;		/* page-aligned, > 0 */
	__u64 va;		/* in: page-aligned VA in the user range, or 0 = pick one; out: VA */
};

/* TVGPU_IOCTL_UNMAP: remove the mapping that starts at va (after the GPU is done with it). */
struct tvgpu_unmap {
	__u64 va;
};

/*
 * TVGPU_IOCTL_SUBMIT: copy count packets into the ring, then a fence; returns its seqno.
 * TVGPU_OP_FENCE packets are the driver's and are refused (-EINVAL). Fails with -EIO while
 * the context is stopped on a fault (see TVGPU_IOCTL_RECOVER).
 */
struct tvgpu_submit {
	__u64 packets;		/* in: user pointer to struct tvgpu_packet[count] */
	__u32 count;		/* in: 1 ..= ring_entries - 1 */
	__u32 flags;		/* in: 0 */
	__u64 seqno;		/* out */
};

/*
 * TVGPU_IOCTL_WAIT: wait until seqno completed. Returns 0, or fails with ETIME (timeout),
 * EIO (the context faulted first), ECANCELED (dropped by TVGPU_IOCTL_RECOVER), EINTR (signal).
 */
struct tvgpu_wait {
	__u64 seqno;
	__s64 timeout_ns;	/* < 0: no timeout; 0: poll */
};

/* TVGPU_IOCTL_CTX_STATE: this file's context, and its fault if it is stopped on one. */
#define TVGPU_STATE_FAULTED		0x1U
struct tvgpu_ctx_state {
	__u32 ctx_id;
	__u32 flags;		/* TVGPU_STATE_* */
	__u32 fault_code;	/* TVGPU_FAULT_* of the fault that stopped the context, or 0 */
	__u32 faults;		/* faults of this context so far */
	__u64 fault_addr;	/* GPU VA (or packet address) of that fault */
	__u64 submitted;	/* last seqno handed out */
	__u64 completed;	/* last seqno completed */
};

#define TVGPU_IOCTL_INFO	_IOR(TVGPU_IOCTL_TYPE, 0x00, struct tvgpu_info)
#define TVGPU_IOCTL_BO_CREATE	_IOWR(TVGPU_IOCTL_TYPE, 0x01, struct tvgpu_bo_create)
#define TVGPU_IOCTL_BO_DESTROY	_IOW(TVGPU_IOCTL_TYPE, 0x02, struct tvgpu_bo_destroy)
#define TVGPU_IOCTL_MAP		_IOWR(TVGPU_IOCTL_TYPE, 0x03, struct tvgpu_map)
#define TVGPU_IOCTL_UNMAP	_IOW(TVGPU_IOCTL_TYPE, 0x04, struct tvgpu_unmap)
#define TVGPU_IOCTL_SUBMIT	_IOWR(TVGPU_IOCTL_TYPE, 0x05, struct tvgpu_submit)
#define TVGPU_IOCTL_WAIT	_IOW(TVGPU_IOCTL_TYPE, 0x06, struct tvgpu_wait)
#define TVGPU_IOCTL_CTX_STATE	_IOR(TVGPU_IOCTL_TYPE, 0x07, struct tvgpu_ctx_state)
#define TVGPU_IOCTL_RECOVER	_IO(TVGPU_IOCTL_TYPE, 0x08)

/* Checked against the device contract at every compile (kernel and user space). */
#ifndef __cplusplus
_Static_assert(sizeof(struct tvgpu_packet) == TVGPU_PACKET_SIZE, "packet size differs from vgpu-abi");
_Static_assert(TVGPU_VA_USER_END <= (1ULL << TVGPU_PTE_VA_BITS), "user VAs beyond the GPU's VA bits");
_Static_assert(sizeof(struct tvgpu_info) == 88, "struct tvgpu_info layout changed");
_Static_assert(sizeof(struct tvgpu_bo_create) == 24, "struct tvgpu_bo_create layout changed");
_Static_assert(sizeof(struct tvgpu_map) == 32, "struct tvgpu_map layout changed");
_Static_assert(sizeof(struct tvgpu_submit) == 24, "struct tvgpu_submit layout changed");
_Static_assert(sizeof(struct tvgpu_wait) == 16, "struct tvgpu_wait layout changed");
_Static_assert(sizeof(struct tvgpu_ctx_state) == 40, "struct tvgpu_ctx_state layout changed");
#endif

#endif /* TESSERA_VGPU_IOCTL_H */
