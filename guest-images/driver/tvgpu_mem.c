// SPDX-License-Identifier: GPL-2.0-only OR MIT
/*
 * tessera_vgpu: GPU memory, the VRAM allocator, buffer objects and GPU page tables.
 *
 * VRAM is this vGPU's partition, reached by the CPU through BAR2 (mapped write-combined) and
 * by the GPU through page-table entries with TVGPU_PTE_VRAM (the address is then a VRAM
 * offset). System memory is allocated one DMA-coherent page at a time: the GPU sees bus
 * addresses (guest-physical: the VMM's DMA domain is the guest's RAM), never a large
 * physically contiguous block.
 */
#include <linux/bitmap.h>
#include <linux/dma-mapping.h>
#include <linux/err.h>
#include <linux/io.h>
#include <linux/slab.h>
#include <linux/mm.h>

#include "tvgpu.h"

/* Largest single allocation (a buffer object). */
#define TVGPU_MAX_ALLOC		(1ULL << 30)

int tvgpu_vram_init(struct tvgpu_device *vgpu)
{
	vgpu->vram_pages = vgpu->vram_size >> PAGE_SHIFT;
	vgpu->vram_free = vgpu->vram_pages;
	vgpu->vram_map = bitmap_zalloc(vgpu->vram_pages, GFP_KERNEL);
	mutex_init(&vgpu->vram_lock);
	return vgpu->vram_map ? 0 : -ENOMEM;
}

void tvgpu_vram_fini(struct tvgpu_device *vgpu)
{
	if (vgpu->vram_map && vgpu->vram_free != vgpu->vram_pages)
		dev_warn(tvgpu_dev(vgpu), "%lu VRAM pages still allocated at teardown\n",
			 vgpu->vram_pages - vgpu->vram_free);
	bitmap_free(vgpu->vram_map);
	vgpu->vram_map = NULL;
}

static int tvgpu_vram_alloc(struct tvgpu_device *vgpu, struct tvgpu_mem *mem)
{
	unsigned long start;

	mutex_lock(&vgpu->vram_lock);
	start = bitmap_find_next_zero_area(vgpu->vram_map, vgpu->vram_pages, 0, mem->npages, 0);
	if (start >= vgpu->vram_pages || start + mem->npages > vgpu->vram_pages) {
		mutex_unlock(&vgpu->vram_lock);
		return -ENOSPC;
	}
	bitmap_set(vgpu->vram_map, start, mem->npages);
	vgpu->vram_free -= mem->npages;
	mutex_unlock(&vgpu->vram_lock);

	mem->vram_off = (u64)start << PAGE_SHIFT;
	mem->io = vgpu->vram + mem->vram_off;
	/* Never hand out what a previous owner left there. */
	memset_io(mem->io, 0, mem->size);
	return 0;
}

static void tvgpu_vram_release(struct tvgpu_device *vgpu, struct tvgpu_mem *mem)
{
	mutex_lock(&vgpu->vram_lock);
	bitmap_clear(vgpu->vram_map, mem->vram_off >> PAGE_SHIFT, mem->npages);
	vgpu->vram_free += mem->npages;
	mutex_unlock(&vgpu->vram_lock);
}

static void tvgpu_sys_release(struct tvgpu_device *vgpu, struct tvgpu_mem *mem)
{
	unsigned long i;

	for (i = 0; i < mem->npages; i++)
		if (mem->vaddr[i])
			dma_free_coherent(tvgpu_dev(vgpu), PAGE_SIZE, mem->vaddr[i], mem->dma[i]);
	kvfree(mem->vaddr);
	kvfree(mem->dma);
}

static int tvgpu_sys_alloc(struct tvgpu_device *vgpu, struct tvgpu_mem *mem)
{
	unsigned long i;

	mem->vaddr = kvcalloc(mem->npages, sizeof(*mem->vaddr), GFP_KERNEL);
	mem->dma = kvcalloc(mem->npages, sizeof(*mem->dma), GFP_KERNEL);
	if (!mem->vaddr || !mem->dma)
		goto fail;
	for (i = 0; i < mem->npages; i++) {
		/* Zeroed by the DMA API. */
		mem->vaddr[i] = dma_alloc_coherent(tvgpu_dev(vgpu), PAGE_SIZE, &mem->dma[i],
						   GFP_KERNEL);
		if (!mem->vaddr[i])
			goto fail;
	}
	return 0;
fail:
	if (mem->vaddr && mem->dma)
		tvgpu_sys_release(vgpu, mem);
	else {
		kvfree(mem->vaddr);
		kvfree(mem->dma);
	}
	return -ENOMEM;
}

/* Zeroed GPU memory of at least size bytes (whole pages) in loc. */
struct tvgpu_mem *tvgpu_mem_alloc(struct tvgpu_device *vgpu, enum tvgpu_loc loc, u64 size)
{
	struct tvgpu_mem *mem;
	int err;

	if (size == 0 || size > TVGPU_MAX_ALLOC)
		return ERR_PTR(-EINVAL);
	if (loc == TVGPU_LOC_SYS && !vgpu->sysmem_ok)
		return ERR_PTR(-EOPNOTSUPP);
	mem = kzalloc(sizeof(*mem), GFP_KERNEL);
	if (!mem)
		return ERR_PTR(-ENOMEM);
	mem->loc = loc;
	mem->size = PAGE_ALIGN(size);
	mem->npages = mem->size >> PAGE_SHIFT;
	err = loc == TVGPU_LOC_VRAM ? tvgpu_vram_alloc(vgpu, mem) : tvgpu_sys_alloc(vgpu, mem);
	if (err) {
		kfree(mem);
		return ERR_PTR(err);
	}
	return mem;
}

void tvgpu_mem_free(struct tvgpu_device *vgpu, struct tvgpu_mem *mem)
{
	if (IS_ERR_OR_NULL(mem))
		return;
	if (mem->loc == TVGPU_LOC_VRAM)
		tvgpu_vram_release(vgpu, mem);
	else
		tvgpu_sys_release(vgpu, mem);
	kfree(mem);
}

/* The page-table address bits (with the VRAM bit) of page `page` of mem. */
u64 tvgpu_mem_pte_addr(const struct tvgpu_mem *mem, unsigned long page)
{
	if (mem->loc == TVGPU_LOC_VRAM)
		return (mem->vram_off + ((u64)page << PAGE_SHIFT)) | TVGPU_PTE_VRAM;
	return (u64)mem->dma[page];
}

void tvgpu_mem_write(struct tvgpu_mem *mem, u64 off, const void *src, size_t len)
{
	const u8 *s = src;

	if (WARN_ON(off + len > mem->size))
		return;
	if (mem->loc == TVGPU_LOC_VRAM) {
		memcpy_toio(mem->io + off, src, len);
		return;
	}
	while (len) {
		size_t in = offset_in_page(off);
		size_t n = min_t(size_t, len, PAGE_SIZE - in);

		memcpy((u8 *)mem->vaddr[off >> PAGE_SHIFT] + in, s, n);
		s += n;
		off += n;
		len -= n;
	}
}

void tvgpu_mem_read(struct tvgpu_mem *mem, u64 off, void *dst, size_t len)
{
	u8 *d = dst;

	if (WARN_ON(off + len > mem->size)) {
		memset(dst, 0, len);
		return;
	}
	if (mem->loc == TVGPU_LOC_VRAM) {
		memcpy_fromio(dst, mem->io + off, len);
		return;
	}
	while (len) {
		size_t in = offset_in_page(off);
		size_t n = min_t(size_t, len, PAGE_SIZE - in);

		memcpy(d, (u8 *)mem->vaddr[off >> PAGE_SHIFT] + in, n);
		d += n;
		off += n;
		len -= n;
	}
}

/* One aligned 64-bit store (page-table entries, fences). */
void tvgpu_mem_wr64(struct tvgpu_mem *mem, u64 off, u64 v)
{
	if (WARN_ON(off + 8 > mem->size || off & 7))
		return;
	if (mem->loc == TVGPU_LOC_VRAM)
		writeq(v, mem->io + off);
	else
		WRITE_ONCE(*(u64 *)((u8 *)mem->vaddr[off >> PAGE_SHIFT] + offset_in_page(off)), v);
}

u64 tvgpu_mem_rd64(struct tvgpu_mem *mem, u64 off)
{
	if (WARN_ON(off + 8 > mem->size || off & 7))
		return 0;
	if (mem->loc == TVGPU_LOC_VRAM)
		return readq(mem->io + off);
	return READ_ONCE(*(u64 *)((u8 *)mem->vaddr[off >> PAGE_SHIFT] + offset_in_page(off)));
}

/* Buffer objects. */

struct tvgpu_bo *tvgpu_bo_create(struct tvgpu_device *vgpu, enum tvgpu_loc loc, u64 size)
{
	struct tvgpu_bo *bo;

	bo = kzalloc(sizeof(*bo), GFP_KERNEL);
	if (!bo)
		return ERR_PTR(-ENOMEM);
	bo->mem = tvgpu_mem_alloc(vgpu, loc, size);
	if (IS_ERR(bo->mem)) {
		long err = PTR_ERR(bo->mem);

		kfree(bo);
		return ERR_PTR(err);
	}
	kref_init(&bo->ref);
	bo->vgpu = vgpu;
	tvgpu_get(vgpu);
	return bo;
}

void tvgpu_bo_get(struct tvgpu_bo *bo)
{
	kref_get(&bo->ref);
}

static void tvgpu_bo_release(struct kref *ref)
{
	struct tvgpu_bo *bo = container_of(ref, struct tvgpu_bo, ref);
	struct tvgpu_device *vgpu = bo->vgpu;

	tvgpu_mem_free(vgpu, bo->mem);
	kfree(bo);
	tvgpu_put(vgpu);
}

void tvgpu_bo_put(struct tvgpu_bo *bo)
{
	if (bo)
		kref_put(&bo->ref, tvgpu_bo_release);
}

/* GPU page tables: 4 levels of 512 entries, in the context's memory (VRAM or system). */

struct tvgpu_pt *tvgpu_pt_create(struct tvgpu_device *vgpu, enum tvgpu_loc loc, unsigned int level)
{
	struct tvgpu_pt *pt;

	BUILD_BUG_ON(PAGE_SIZE != TVGPU_PAGE_SIZE);
	BUILD_BUG_ON(TVGPU_PTE_ENTRIES * 8 != TVGPU_PAGE_SIZE);
	pt = kzalloc(sizeof(*pt), GFP_KERNEL);
	if (!pt)
		return NULL;
	pt->level = level;
	pt->mem = tvgpu_mem_alloc(vgpu, loc, PAGE_SIZE);
	if (IS_ERR(pt->mem))
		goto fail;
	if (level > 1) {
		pt->child = kcalloc(TVGPU_PTE_ENTRIES, sizeof(*pt->child), GFP_KERNEL);
		if (!pt->child)
			goto fail;
	}
	return pt;
fail:
	if (!IS_ERR(pt->mem))
		tvgpu_mem_free(vgpu, pt->mem);
	kfree(pt);
	return NULL;
}

void tvgpu_pt_destroy(struct tvgpu_device *vgpu, struct tvgpu_pt *pt)
{
	unsigned int i;

	if (!pt)
		return;
	if (pt->child) {
		for (i = 0; i < TVGPU_PTE_ENTRIES; i++)
			tvgpu_pt_destroy(vgpu, pt->child[i]);
		kfree(pt->child);
	}
	tvgpu_mem_free(vgpu, pt->mem);
	kfree(pt);
}

static unsigned int tvgpu_pt_index(u64 va, unsigned int level)
{
	return (va >> (12 + 9 * (level - 1))) & (TVGPU_PTE_ENTRIES - 1);
}

/*
 * Writes the level-1 entry for va (a raw entry: the self-test also writes bad ones), creating
 * the tables above it. The caller flushes the context's TLB.
 */
int tvgpu_pt_set(struct tvgpu_context *ctx, u64 va, u64 entry)
{
	struct tvgpu_pt *pt = ctx->root;

	while (pt->level > 1) {
		unsigned int i = tvgpu_pt_index(va, pt->level);

		if (!pt->child[i]) {
			struct tvgpu_pt *c = tvgpu_pt_create(ctx->vgpu, ctx->loc, pt->level - 1);

			if (!c)
				return -ENOMEM;
			pt->child[i] = c;
			/* Table entries: present only; write permission is checked at the leaf. */
			tvgpu_mem_wr64(pt->mem, i * 8ULL,
				       tvgpu_mem_pte_addr(c->mem, 0) | TVGPU_PTE_PRESENT);
		}
		pt = pt->child[i];
	}
	tvgpu_mem_wr64(pt->mem, tvgpu_pt_index(va, 1) * 8ULL, entry);
	return 0;
}

/* The value for CTX_PT_ROOT. */
u64 tvgpu_pt_root_reg(const struct tvgpu_context *ctx)
{
	return tvgpu_mem_pte_addr(ctx->root->mem, 0);
}
