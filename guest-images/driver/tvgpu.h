/* SPDX-License-Identifier: GPL-2.0-only OR MIT */
/*
 * tessera_vgpu: Linux driver for the Tessera vGPU. Internal interfaces.
 *
 * Layout of the driver:
 *   tvgpu_main.c      PCI probe/remove, BARs, MSI-X and the interrupt handler, device reset,
 *                     the character devices
 *   tvgpu_mem.c       GPU memory (VRAM through the aperture, DMA-coherent system memory),
 *                     the VRAM allocator, buffer objects, GPU page tables
 *   tvgpu_ctx.c       contexts: ring, fence, submission, waiting, faults, recovery
 *   tvgpu_file.c      the file interface: open/release, ioctls, mmap
 *   tvgpu_selftest.c  the in-kernel self-test run at probe (module parameter selftest=1)
 *
 * Everything the ioctls do goes through the functions below, and so does the self-test: it
 * tests the driver's own code paths against the device.
 */
#ifndef TVGPU_H
#define TVGPU_H

#include <linux/atomic.h>
#include <linux/cdev.h>
#include <linux/idr.h>
#include <linux/kref.h>
#include <linux/list.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/rwsem.h>
#include <linux/spinlock.h>
#include <linux/types.h>
#include <linux/wait.h>

#include "tessera_vgpu.h"
#include "tessera_vgpu_ioctl.h"

#define TVGPU_DRV_NAME		"tessera_vgpu"
#define TVGPU_MAX_DEVICES	64
#define TVGPU_NVEC_MAX		((unsigned int)TVGPU_PCI_MSIX_VECTORS)

/* Kernel-owned part of every context's GPU VA space (below TVGPU_VA_USER_START). */
#define TVGPU_RING_VA		0x100000ULL
#define TVGPU_FENCE_VA		0x200000ULL
/* In the fence page: the fence value at 0, the ring tail shadow here. */
#define TVGPU_TAIL_SHADOW_OFF	64
/* Default (and largest) ring of a context, in packets. */
#define TVGPU_RING_ENTRIES	256
/* Dropped seqno ranges a context remembers. */
#define TVGPU_DROPPED_RANGES	4

enum tvgpu_loc {
	TVGPU_LOC_SYS,
	TVGPU_LOC_VRAM,
};

/*
 * GPU memory: a contiguous VRAM range (CPU access through the BAR2 aperture), or system
 * memory as one DMA-coherent page per page (physically scattered, no large allocations).
 */
struct tvgpu_mem {
	enum tvgpu_loc loc;
	u64 size;		/* bytes, whole pages */
	unsigned long npages;
	u64 vram_off;		/* VRAM: offset in VRAM */
	void __iomem *io;	/* VRAM: aperture mapping of the range */
	void **vaddr;		/* SYS: kernel address of each page */
	dma_addr_t *dma;	/* SYS: bus address of each page */
};

/* A buffer object: GPU memory that user space (or the self-test) can map. */
struct tvgpu_bo {
	struct kref ref;
	struct tvgpu_device *vgpu;	/* holds a reference */
	struct tvgpu_mem *mem;
	u32 handle;
};

/* One page-table page, and (above level 1) the tables its entries point to. */
struct tvgpu_pt {
	struct tvgpu_mem *mem;
	struct tvgpu_pt **child;	/* TVGPU_PTE_ENTRIES pointers; NULL at level 1 */
	unsigned int level;		/* 4 = root .. 1 = 4 KiB leaves */
};

/* A GPU VA range mapped to a buffer object. */
struct tvgpu_mapping {
	struct list_head node;
	u64 va;
	u64 size;
	struct tvgpu_bo *bo;		/* holds a reference */
	u64 bo_offset;
	bool writable;
};

/* A GPU context: its own address space, ring and fence. */
struct tvgpu_context {
	struct tvgpu_device *vgpu;
	u32 id;
	enum tvgpu_loc loc;		/* where its page tables, ring and fence page live */
	bool doorbell;			/* submit through the tail shadow + doorbell */
	bool suppress;			/* ... ringing only when the device's hint asks */
	u64 doorbells_saved;		/* submissions the device saw without a doorbell */
	struct mutex lock;		/* submission, mappings, recovery */
	struct tvgpu_pt *root;
	struct tvgpu_mem *ring;
	u32 ring_entries;
	u32 tail;			/* packets written, free-running */
	struct tvgpu_mem *fence;
	u64 seqno;			/* last fence value submitted */
	struct list_head mappings;
	struct list_head zombie;	/* in vgpu->zombies */
	u64 next_va;			/* for TVGPU_IOCTL_MAP with va = 0 */
	wait_queue_head_t wq;
	/* Updated by the interrupt handler, under vgpu->irq_lock. */
	u64 completed;
	/* Seqnos (from, to] dropped by the last recoveries (older ones are forgotten). */
	struct { u64 from, to; } dropped[TVGPU_DROPPED_RANGES];
	unsigned int ndropped;
	bool faulted;
	u32 fault_code;
	u64 fault_addr;
	u32 faults;
	atomic_t fence_irqs;
};

struct tvgpu_vector {
	struct tvgpu_device *vgpu;
	unsigned int index;
	atomic_t count;
	char name[32];
};

struct tvgpu_device {
	struct kref ref;
	struct pci_dev *pdev;		/* holds a reference */
	void __iomem *regs;		/* BAR0 */
	void __iomem *vram;		/* BAR2, write-combined */
	resource_size_t vram_phys;
	u64 vram_size;			/* usable: min(VRAM_SIZE, BAR2 size) */
	u32 version, caps, kernels, num_ctx, max_ring;
	/* The GPU can reach system memory: CAP_SYSMEM, and bus addresses are guest-physical. */
	bool sysmem_ok;

	/* MSI-X: entry 0 = faults; context c uses entry 1 + c % (nvec - 1) (all on 0 if nvec == 1). */
	unsigned int nvec;
	struct tvgpu_vector vec[TVGPU_NVEC_MAX];

	/* Contexts; the table is read by the interrupt handler. */
	spinlock_t irq_lock;
	struct tvgpu_context *ctx[TVGPU_MAX_CONTEXTS];
	unsigned long ctx_used;		/* ids handed out (bitmap) */
	/*
	 * Contexts closed while their work was still running: the device may still write
	 * their memory, so it (and the context id) is kept until the device is reset.
	 */
	struct list_head zombies;

	/* VRAM allocator: one bit per page. */
	struct mutex vram_lock;
	unsigned long *vram_map;
	unsigned long vram_pages;
	unsigned long vram_free;

	/* Removal: ioctls run under the read side; remove() takes the write side after setting dead. */
	struct rw_semaphore remove_sem;
	bool dead;

	/* Character device. */
	int minor;
	dev_t devt;
	struct cdev *cdev;
	struct device *chardev;
	struct mutex files_lock;
	struct list_head files;
};

/* Per open file. */
struct tvgpu_file {
	struct tvgpu_device *vgpu;	/* holds a reference */
	struct file *filp;
	struct list_head node;		/* in vgpu->files */
	struct mutex lock;
	struct idr bos;			/* handle -> struct tvgpu_bo (holds a reference) */
	struct tvgpu_context *ctx;	/* created on first use */
};

/* Register access. */
static inline u32 tvgpu_rd(struct tvgpu_device *vgpu, u64 off)
{
	return readl(vgpu->regs + off);
}

static inline void tvgpu_wr(struct tvgpu_device *vgpu, u64 off, u32 v)
{
	writel(v, vgpu->regs + off);
}

static inline u64 tvgpu_rd64(struct tvgpu_device *vgpu, u64 lo)
{
	u32 l = tvgpu_rd(vgpu, lo);

	return (u64)tvgpu_rd(vgpu, lo + 4) << 32 | l;
}

static inline u32 tvgpu_ctx_rd(struct tvgpu_device *vgpu, u32 ctx, u64 reg)
{
	return tvgpu_rd(vgpu, TVGPU_CTX_REG(ctx, reg));
}

static inline void tvgpu_ctx_wr(struct tvgpu_device *vgpu, u32 ctx, u64 reg, u32 v)
{
	tvgpu_wr(vgpu, TVGPU_CTX_REG(ctx, reg), v);
}

static inline void tvgpu_ctx_wr64(struct tvgpu_device *vgpu, u32 ctx, u64 lo, u64 v)
{
	tvgpu_ctx_wr(vgpu, ctx, lo, lower_32_bits(v));
	tvgpu_ctx_wr(vgpu, ctx, lo + 4, upper_32_bits(v));
}

static inline struct device *tvgpu_dev(struct tvgpu_device *vgpu)
{
	return &vgpu->pdev->dev;
}

/* tvgpu_main.c */
void tvgpu_get(struct tvgpu_device *vgpu);
void tvgpu_put(struct tvgpu_device *vgpu);
int tvgpu_hw_reset(struct tvgpu_device *vgpu);
unsigned int tvgpu_ctx_vector(struct tvgpu_device *vgpu, u32 ctx);
const char *tvgpu_fault_name(u32 code);
struct tvgpu_device *tvgpu_lookup_minor(int minor);

/* tvgpu_mem.c */
int tvgpu_vram_init(struct tvgpu_device *vgpu);
void tvgpu_vram_fini(struct tvgpu_device *vgpu);
struct tvgpu_mem *tvgpu_mem_alloc(struct tvgpu_device *vgpu, enum tvgpu_loc loc, u64 size);
void tvgpu_mem_free(struct tvgpu_device *vgpu, struct tvgpu_mem *mem);
u64 tvgpu_mem_pte_addr(const struct tvgpu_mem *mem, unsigned long page);
void tvgpu_mem_write(struct tvgpu_mem *mem, u64 off, const void *src, size_t len);
void tvgpu_mem_read(struct tvgpu_mem *mem, u64 off, void *dst, size_t len);
void tvgpu_mem_wr64(struct tvgpu_mem *mem, u64 off, u64 v);
u64 tvgpu_mem_rd64(struct tvgpu_mem *mem, u64 off);
struct tvgpu_bo *tvgpu_bo_create(struct tvgpu_device *vgpu, enum tvgpu_loc loc, u64 size);
void tvgpu_bo_get(struct tvgpu_bo *bo);
void tvgpu_bo_put(struct tvgpu_bo *bo);
struct tvgpu_pt *tvgpu_pt_create(struct tvgpu_device *vgpu, enum tvgpu_loc loc, unsigned int level);
void tvgpu_pt_destroy(struct tvgpu_device *vgpu, struct tvgpu_pt *pt);
int tvgpu_pt_set(struct tvgpu_context *ctx, u64 va, u64 entry);
u64 tvgpu_pt_root_reg(const struct tvgpu_context *ctx);

/* tvgpu_ctx.c */
struct tvgpu_context *tvgpu_ctx_create(struct tvgpu_device *vgpu, enum tvgpu_loc loc,
				       u32 ring_entries, bool doorbell);
void tvgpu_ctx_destroy(struct tvgpu_context *ctx);
void tvgpu_free_zombies(struct tvgpu_device *vgpu);
int tvgpu_ctx_map(struct tvgpu_context *ctx, struct tvgpu_bo *bo, u64 bo_offset, u64 size,
		  u64 *va, bool writable);
int tvgpu_ctx_unmap(struct tvgpu_context *ctx, u64 va);
int tvgpu_ctx_submit(struct tvgpu_context *ctx, const struct tvgpu_packet *pkts, u32 count,
		     u64 *seqno);
int tvgpu_ctx_wait(struct tvgpu_context *ctx, u64 seqno, s64 timeout_ns, bool interruptible);
int tvgpu_ctx_recover(struct tvgpu_context *ctx);
void tvgpu_irq_faults(struct tvgpu_device *vgpu);
void tvgpu_irq_fence(struct tvgpu_device *vgpu, u32 id);
void tvgpu_wake_all(struct tvgpu_device *vgpu);

/* tvgpu_file.c */
extern const struct file_operations tvgpu_fops;
void tvgpu_zap_mappings(struct tvgpu_device *vgpu);

/* tvgpu_selftest.c */
void tvgpu_selftest(struct tvgpu_device *vgpu);

#endif /* TVGPU_H */
