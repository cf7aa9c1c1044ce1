// SPDX-License-Identifier: GPL-2.0-only OR MIT
/*
 * tessera_vgpu: the in-kernel self-test (module parameter selftest=1, or
 * tessera_vgpu.selftest=1 on the kernel command line when built in).
 *
 * Runs at probe, before the character device exists, through the driver's own code paths
 * (contexts, buffer objects, page tables, submission, interrupts, waits, recovery, reset):
 * the conformance cases that make sense from the kernel. One line per case,
 *
 *   tessera_vgpu 0000:00:01.0: selftest <case> ok (<ms> ms)
 *   tessera_vgpu 0000:00:01.0: selftest <case> FAIL: <why>
 *
 * then "selftest: N/M passed". Buffers are small on purpose: on hosts without hardware
 * virtualization (PVM) ring-0 code is emulated, about 0.6 us per instruction, and every
 * register access exits to the VMM. The device is reset at the end.
 */
#include <linux/delay.h>
#include <linux/err.h>
#include <linux/ktime.h>
#include <linux/slab.h>

#include "tvgpu.h"

#define ST_MAX_CTX	4
#define ST_MAX_BO	12
/* Generous: a loaded host may starve the VM's vGPU thread for a while. */
#define ST_TIMEOUT_NS	(20LL * NSEC_PER_SEC)
/* A VA that no case maps (well above what the driver picks for small buffers). */
#define ST_HOLE_VA	(TVGPU_VA_USER_START + 0x40000000ULL)

struct tvgpu_st {
	struct tvgpu_device *vgpu;
	struct tvgpu_context *ctx[ST_MAX_CTX];
	struct tvgpu_bo *bo[ST_MAX_BO];
	char msg[200];
};

static __printf(2, 3) int st_fail(struct tvgpu_st *st, const char *fmt, ...)
{
	va_list ap;

	if (st->msg[0])	/* keep the first (innermost) reason */
		return -EINVAL;
	va_start(ap, fmt);
	vsnprintf(st->msg, sizeof(st->msg), fmt, ap);
	va_end(ap);
	return -EINVAL;
}

#define ST_CHECK(st, cond, fmt, ...)						\
	do {									\
		if (!(cond))							\
			return st_fail(st, fmt, ##__VA_ARGS__);			\
	} while (0)

#define ST_TRY(expr)								\
	do {									\
		int __e = (expr);						\
		if (__e)							\
			return __e;						\
	} while (0)

static void st_cleanup(struct tvgpu_st *st)
{
	int i;

	for (i = 0; i < ST_MAX_CTX; i++) {
		if (st->ctx[i])
			tvgpu_ctx_destroy(st->ctx[i]);
		st->ctx[i] = NULL;
	}
	for (i = 0; i < ST_MAX_BO; i++) {
		tvgpu_bo_put(st->bo[i]);
		st->bo[i] = NULL;
	}
}

static struct tvgpu_context *st_ctx(struct tvgpu_st *st, enum tvgpu_loc loc, u32 ring,
				    bool doorbell)
{
	struct tvgpu_context *ctx;
	int i;

	for (i = 0; i < ST_MAX_CTX && st->ctx[i]; i++)
		;
	if (i == ST_MAX_CTX) {
		st_fail(st, "too many contexts in one case");
		return NULL;
	}
	ctx = tvgpu_ctx_create(st->vgpu, loc, ring, doorbell);
	if (IS_ERR(ctx)) {
		st_fail(st, "cannot create a context: %ld", PTR_ERR(ctx));
		return NULL;
	}
	st->ctx[i] = ctx;
	return ctx;
}

static struct tvgpu_bo *st_bo(struct tvgpu_st *st, enum tvgpu_loc loc, u64 size)
{
	struct tvgpu_bo *bo;
	int i;

	for (i = 0; i < ST_MAX_BO && st->bo[i]; i++)
		;
	if (i == ST_MAX_BO) {
		st_fail(st, "too many buffers in one case");
		return NULL;
	}
	bo = tvgpu_bo_create(st->vgpu, loc, size);
	if (IS_ERR(bo)) {
		st_fail(st, "cannot create a %s buffer of %llu bytes: %ld",
			loc == TVGPU_LOC_VRAM ? "VRAM" : "sysmem", size, PTR_ERR(bo));
		return NULL;
	}
	st->bo[i] = bo;
	return bo;
}

/* A buffer of size bytes in loc, mapped in ctx; its VA in *va. */
static struct tvgpu_bo *st_buf(struct tvgpu_st *st, struct tvgpu_context *ctx,
			       enum tvgpu_loc loc, u64 size, bool writable, u64 *va)
{
	struct tvgpu_bo *bo = st_bo(st, loc, size);
	int err;

	if (!bo)
		return NULL;
	err = tvgpu_ctx_map(ctx, bo, 0, bo->mem->size, va, writable);
	if (err) {
		st_fail(st, "cannot map a buffer at %#llx: %d", *va, err);
		return NULL;
	}
	return bo;
}

static struct tvgpu_packet pkt(u32 op, u32 flags, u64 a0, u64 a1, u64 a2)
{
	struct tvgpu_packet p = { .opcode = op, .flags = flags };

	p.args[0] = a0;
	p.args[1] = a1;
	p.args[2] = a2;
	return p;
}

static struct tvgpu_packet pkt_fill(u64 va, u64 len, u32 pattern)
{
	return pkt(TVGPU_OP_FILL, 0, va, len, pattern);
}

static struct tvgpu_packet pkt_copy(u64 src, u64 dst, u64 len)
{
	return pkt(TVGPU_OP_COPY, 0, src, dst, len);
}

static struct tvgpu_packet pkt_spin(u64 us, u64 groups)
{
	return pkt(TVGPU_OP_DISPATCH, TVGPU_KERNEL_SPIN_US, us, groups, 0);
}

static const char *st_loc(enum tvgpu_loc loc)
{
	return loc == TVGPU_LOC_VRAM ? "vram" : "sysmem";
}

static int st_describe(struct tvgpu_st *st, struct tvgpu_context *ctx, const char *what, int err)
{
	struct tvgpu_device *vgpu = st->vgpu;

	return st_fail(st, "%s: %d (ctx %u: status %#x head %u tail %u fence %llu fault %s at %#llx)",
		       what, err, ctx->id, tvgpu_ctx_rd(vgpu, ctx->id, TVGPU_CTX_STATUS),
		       tvgpu_ctx_rd(vgpu, ctx->id, TVGPU_CTX_RING_HEAD),
		       tvgpu_ctx_rd(vgpu, ctx->id, TVGPU_CTX_RING_TAIL),
		       tvgpu_rd64(vgpu, TVGPU_CTX_REG(ctx->id, TVGPU_CTX_FENCE_LO)),
		       tvgpu_fault_name(tvgpu_ctx_rd(vgpu, ctx->id, TVGPU_CTX_FAULT_CODE)),
		       tvgpu_rd64(vgpu, TVGPU_CTX_REG(ctx->id, TVGPU_CTX_FAULT_ADDR_LO)));
}

/* Submit and wait for completion. */
static int st_run(struct tvgpu_st *st, struct tvgpu_context *ctx,
		  const struct tvgpu_packet *p, u32 n)
{
	u64 seq;
	int err;

	err = tvgpu_ctx_submit(ctx, p, n, &seq);
	if (err)
		return st_describe(st, ctx, "submit", err);
	err = tvgpu_ctx_wait(ctx, seq, ST_TIMEOUT_NS, false);
	if (err)
		return st_describe(st, ctx, "wait", err);
	return 0;
}

/* Every u32 of [off, off + len) of bo holds v. */
static int st_expect_u32(struct tvgpu_st *st, struct tvgpu_bo *bo, u64 off, u64 len, u32 v,
			 const char *what)
{
	u32 buf[64];
	u64 done;
	size_t i;

	for (done = 0; done < len; done += sizeof(buf)) {
		size_t n = min_t(u64, sizeof(buf), len - done);

		tvgpu_mem_read(bo->mem, off + done, buf, n);
		for (i = 0; i < n / 4; i++)
			ST_CHECK(st, buf[i] == v, "%s: word at %#llx is %#x, expected %#x", what,
				 off + done + i * 4, buf[i], v);
	}
	return 0;
}

/*
 * Whether *count moved at least delta past old, allowing an interrupt up to a second to
 * arrive (a waiter may see the registers change, by polling, before the interrupt lands).
 */
static bool st_counted(atomic_t *count, int old, int delta)
{
	int i;

	for (i = 0; i < 1000 && atomic_read(count) - old < delta; i++)
		usleep_range(1000, 2000);
	return atomic_read(count) - old >= delta;
}

/* Submit packets that must fault ctx with code (and at addr, unless ~0). */
static int st_expect_fault(struct tvgpu_st *st, struct tvgpu_context *ctx,
			   const struct tvgpu_packet *p, u32 n, u32 code, u64 addr)
{
	struct tvgpu_device *vgpu = st->vgpu;
	u32 fault_irqs = atomic_read(&vgpu->vec[0].count);
	u32 count = tvgpu_rd(vgpu, TVGPU_REG_FAULT_COUNT);
	u64 seq;
	int err;

	err = tvgpu_ctx_submit(ctx, p, n, &seq);
	if (err)
		return st_describe(st, ctx, "submit", err);
	err = tvgpu_ctx_wait(ctx, seq, ST_TIMEOUT_NS, false);
	if (err != -EIO)
		return st_describe(st, ctx, "expected the wait to fail with -EIO", err);
	ST_CHECK(st, ctx->fault_code == code, "fault %s (%u), expected %s (%u)",
		 tvgpu_fault_name(ctx->fault_code), ctx->fault_code, tvgpu_fault_name(code), code);
	ST_CHECK(st, addr == ~0ULL || ctx->fault_addr == addr, "fault address %#llx, expected %#llx",
		 ctx->fault_addr, addr);
	ST_CHECK(st, tvgpu_rd(vgpu, TVGPU_REG_FAULT_CTX) == ctx->id, "FAULT_CTX %u, expected %u",
		 tvgpu_rd(vgpu, TVGPU_REG_FAULT_CTX), ctx->id);
	ST_CHECK(st, tvgpu_rd(vgpu, TVGPU_REG_FAULT_CODE) == code, "FAULT_CODE %u, expected %u",
		 tvgpu_rd(vgpu, TVGPU_REG_FAULT_CODE), code);
	ST_CHECK(st, tvgpu_rd(vgpu, TVGPU_REG_FAULT_COUNT) == count + 1, "FAULT_COUNT %u, expected %u",
		 tvgpu_rd(vgpu, TVGPU_REG_FAULT_COUNT), count + 1);
	ST_CHECK(st, tvgpu_rd(vgpu, TVGPU_REG_STATUS) & TVGPU_STATUS_FAULTED,
		 "STATUS.FAULTED not set");
	ST_CHECK(st, st_counted(&vgpu->vec[0].count, fault_irqs, 1),
		 "no interrupt on the fault vector");
	return 0;
}

/* Recover ctx from a fault and check it works again. */
static int st_recover(struct tvgpu_st *st, struct tvgpu_context *ctx, u64 va, u32 pattern)
{
	struct tvgpu_packet p = pkt_fill(va, 8, pattern);
	u64 seq;
	int err;

	err = tvgpu_ctx_submit(ctx, &p, 1, &seq);
	ST_CHECK(st, err == -EIO, "submit on a faulted context: %d, expected -EIO", err);
	ST_TRY(tvgpu_ctx_recover(ctx));
	ST_CHECK(st, !(tvgpu_ctx_rd(st->vgpu, ctx->id, TVGPU_CTX_STATUS) & TVGPU_CTX_STATUS_FAULTED),
		 "CTX_STATUS.FAULTED after recovery");
	ST_TRY(st_run(st, ctx, &p, 1));
	return 0;
}

/* --- cases --- */

static int st_registers(struct tvgpu_st *st)
{
	struct tvgpu_device *vgpu = st->vgpu;
	u32 want = TVGPU_CAP_SYSMEM | TVGPU_CAP_WAIT;

	ST_CHECK(st, tvgpu_rd(vgpu, TVGPU_REG_MAGIC) == TVGPU_MAGIC_VALUE, "MAGIC %#x",
		 tvgpu_rd(vgpu, TVGPU_REG_MAGIC));
	ST_CHECK(st, vgpu->version >> 16 == TVGPU_VERSION_MAJOR, "VERSION %#x", vgpu->version);
	ST_CHECK(st, (vgpu->caps & want) == want, "CAPS %#x lacks %#x", vgpu->caps, want);
	ST_CHECK(st, vgpu->num_ctx >= 2, "NUM_CONTEXTS %u", vgpu->num_ctx);
	ST_CHECK(st, (vgpu->kernels & TVGPU_KERNELS_ALL) == TVGPU_KERNELS_ALL, "KERNELS %#x",
		 vgpu->kernels);
	ST_CHECK(st, tvgpu_rd(vgpu, TVGPU_REG_STATUS) == TVGPU_STATUS_READY, "STATUS %#x",
		 tvgpu_rd(vgpu, TVGPU_REG_STATUS));
	ST_CHECK(st, tvgpu_rd64(vgpu, TVGPU_REG_VRAM_SIZE_LO) <=
		 pci_resource_len(vgpu->pdev, TVGPU_PCI_BAR_VRAM),
		 "VRAM_SIZE %#llx larger than BAR2", tvgpu_rd64(vgpu, TVGPU_REG_VRAM_SIZE_LO));
	ST_CHECK(st, tvgpu_rd(vgpu, TVGPU_REG_FAULT_COUNT) == 0, "FAULT_COUNT %u after reset",
		 tvgpu_rd(vgpu, TVGPU_REG_FAULT_COUNT));
	return 0;
}

static int st_msix(struct tvgpu_st *st)
{
	struct tvgpu_device *vgpu = st->vgpu;
	unsigned int want = min_t(unsigned int, TVGPU_NVEC_MAX, 1 + vgpu->num_ctx);

	ST_CHECK(st, vgpu->pdev->msix_enabled, "MSI-X is not enabled");
	ST_CHECK(st, vgpu->nvec == want, "%u vectors, expected %u", vgpu->nvec, want);
	ST_CHECK(st, tvgpu_rd(vgpu, TVGPU_REG_FAULT_VECTOR) == 0, "FAULT_VECTOR %u",
		 tvgpu_rd(vgpu, TVGPU_REG_FAULT_VECTOR));
	ST_CHECK(st, tvgpu_rd(vgpu, TVGPU_REG_INT_MASK) == 0, "INT_MASK %#x",
		 tvgpu_rd(vgpu, TVGPU_REG_INT_MASK));
	return 0;
}

static int st_vram_aperture(struct tvgpu_st *st)
{
	struct tvgpu_context *ctx = st_ctx(st, TVGPU_LOC_SYS, 16, true);
	struct tvgpu_bo *vram, *sys;
	u64 vva = 0, sva = 0;
	u32 pat[64], back[64];
	struct tvgpu_packet p[2];
	int i;

	if (!ctx)
		return -EINVAL;
	vram = st_buf(st, ctx, TVGPU_LOC_VRAM, PAGE_SIZE, true, &vva);
	sys = vram ? st_buf(st, ctx, TVGPU_LOC_SYS, PAGE_SIZE, true, &sva) : NULL;
	if (!sys)
		return -EINVAL;
	/* CPU through the aperture, read back. */
	for (i = 0; i < ARRAY_SIZE(pat); i++)
		pat[i] = 0x9e3779b9U * (i + 1);
	tvgpu_mem_write(vram->mem, 256, pat, sizeof(pat));
	tvgpu_mem_read(vram->mem, 256, back, sizeof(back));
	ST_CHECK(st, !memcmp(pat, back, sizeof(pat)), "aperture read-back differs");
	/* GPU reads what the CPU wrote, and writes what the CPU reads. */
	p[0] = pkt_copy(vva + 256, sva, sizeof(pat));
	p[1] = pkt_fill(vva + 1024, 512, 0x600dcafe);
	ST_TRY(st_run(st, ctx, p, 2));
	tvgpu_mem_read(sys->mem, 0, back, sizeof(back));
	ST_CHECK(st, !memcmp(pat, back, sizeof(pat)), "GPU copy from VRAM differs");
	return st_expect_u32(st, vram, 1024, 512, 0x600dcafe, "GPU fill seen through the aperture");
}

/* Page tables, ring and fence in loc; buffers in both memories, 2 pages each. */
static int st_page_tables(struct tvgpu_st *st, enum tvgpu_loc loc, bool doorbell)
{
	struct tvgpu_context *ctx = st_ctx(st, loc, 16, doorbell);
	struct tvgpu_bo *a, *b;
	u64 ava = 0, bva = 0;
	struct tvgpu_packet p[3];

	if (!ctx)
		return -EINVAL;
	ST_CHECK(st, ctx->doorbell == (doorbell && (st->vgpu->caps & TVGPU_CAP_TAIL_SHADOW)),
		 "doorbell path not selected");
	ST_CHECK(st, ctx->suppress == (ctx->doorbell &&
				       (st->vgpu->caps & TVGPU_CAP_DOORBELL_SUPPRESS)),
		 "doorbell suppression not selected");
	ST_CHECK(st, (tvgpu_pt_root_reg(ctx) & TVGPU_PTE_VRAM) == (loc == TVGPU_LOC_VRAM ?
		 TVGPU_PTE_VRAM : 0), "page-table root %#llx not in %s", tvgpu_pt_root_reg(ctx),
		 st_loc(loc));
	a = st_buf(st, ctx, TVGPU_LOC_SYS, 2 * PAGE_SIZE, true, &ava);
	b = a ? st_buf(st, ctx, TVGPU_LOC_VRAM, 2 * PAGE_SIZE, true, &bva) : NULL;
	if (!b)
		return -EINVAL;
	/* Fill across the page boundary, then copy across both memories. */
	p[0] = pkt_fill(ava, 2 * PAGE_SIZE, 0xa5a5a5a5);
	p[1] = pkt_fill(ava + PAGE_SIZE - 64, 128, 0x12345678);
	p[2] = pkt_copy(ava, bva, 2 * PAGE_SIZE);
	ST_TRY(st_run(st, ctx, p, 3));
	ST_TRY(st_expect_u32(st, a, 0, PAGE_SIZE - 64, 0xa5a5a5a5, "sysmem fill"));
	ST_TRY(st_expect_u32(st, a, PAGE_SIZE - 64, 128, 0x12345678, "sysmem fill across pages"));
	ST_TRY(st_expect_u32(st, b, PAGE_SIZE + 64, PAGE_SIZE - 64, 0xa5a5a5a5, "copy to VRAM"));
	ST_TRY(st_expect_u32(st, b, PAGE_SIZE - 64, 128, 0x12345678, "copy to VRAM across pages"));
	/* The fence value landed in the fence page too. */
	ST_CHECK(st, tvgpu_mem_rd64(ctx->fence, 0) == ctx->seqno, "fence page holds %llu, expected %llu",
		 tvgpu_mem_rd64(ctx->fence, 0), ctx->seqno);
	return 0;
}

static int st_page_tables_sysmem(struct tvgpu_st *st)
{
	return st_page_tables(st, TVGPU_LOC_SYS, false);
}

static int st_page_tables_vram(struct tvgpu_st *st)
{
	return st_page_tables(st, TVGPU_LOC_VRAM, true);
}

/* An 8-packet ring, 4 packets per submission, 6 submissions in a row: it wraps 3 times. */
static int st_ring_wrap(struct tvgpu_st *st)
{
	struct tvgpu_context *ctx = st_ctx(st, TVGPU_LOC_SYS, 8, true);
	struct tvgpu_bo *bo;
	struct tvgpu_packet p[3];
	u64 va = 0, seq[6];
	int r, err;

	if (!ctx)
		return -EINVAL;
	bo = st_buf(st, ctx, TVGPU_LOC_SYS, PAGE_SIZE, true, &va);
	if (!bo)
		return -EINVAL;
	for (r = 0; r < 6; r++) {
		p[0] = pkt(TVGPU_OP_NOP, 0, 0, 0, 0);
		p[1] = pkt_fill(va + r * 16, 16, 0x100 + r);
		p[2] = pkt(TVGPU_OP_NOP, 0, 0, 0, 0);
		err = tvgpu_ctx_submit(ctx, p, 3, &seq[r]);
		if (err)
			return st_describe(st, ctx, "submit", err);
	}
	for (r = 0; r < 6; r++) {
		err = tvgpu_ctx_wait(ctx, seq[r], ST_TIMEOUT_NS, false);
		if (err)
			return st_describe(st, ctx, "wait", err);
		ST_TRY(st_expect_u32(st, bo, r * 16, 16, 0x100 + r, "fill"));
	}
	ST_CHECK(st, ctx->tail == 24, "tail %u, expected 24", ctx->tail);
	ST_CHECK(st, tvgpu_ctx_rd(st->vgpu, ctx->id, TVGPU_CTX_RING_HEAD) == 24, "head %u",
		 tvgpu_ctx_rd(st->vgpu, ctx->id, TVGPU_CTX_RING_HEAD));
	return 0;
}

/* Fence interrupts arrive on the context's MSI-X vector and nowhere else. */
static int st_fence_irq(struct tvgpu_st *st)
{
	struct tvgpu_device *vgpu = st->vgpu;
	struct tvgpu_context *ctx[2];
	struct tvgpu_packet p = pkt(TVGPU_OP_NOP, 0, 0, 0, 0);
	int i, r;

	for (i = 0; i < 2; i++) {
		ctx[i] = st_ctx(st, TVGPU_LOC_SYS, 16, i == 0);
		if (!ctx[i])
			return -EINVAL;
	}
	for (i = 0; i < 2; i++) {
		unsigned int v = tvgpu_ctx_vector(vgpu, ctx[i]->id);
		u32 ctx_irqs = atomic_read(&ctx[i]->fence_irqs);
		u32 vec_irqs = atomic_read(&vgpu->vec[v].count);
		u32 fault_irqs = atomic_read(&vgpu->vec[0].count);

		ST_CHECK(st, tvgpu_ctx_rd(vgpu, ctx[i]->id, TVGPU_CTX_IRQ_VECTOR) == v,
			 "CTX_IRQ_VECTOR %u, expected %u",
			 tvgpu_ctx_rd(vgpu, ctx[i]->id, TVGPU_CTX_IRQ_VECTOR), v);
		for (r = 0; r < 3; r++) {
			ST_TRY(st_run(st, ctx[i], &p, 1));
			/*
			 * The wait may end by spinning on the fence word before the interrupt is
			 * taken; the next fence's MSI on the same vector would then merge with it in
			 * the APIC (one pending bit per vector). Take each before the next.
			 */
			st_counted(&ctx[i]->fence_irqs, ctx_irqs, r + 1);
		}
		ST_CHECK(st, st_counted(&ctx[i]->fence_irqs, ctx_irqs, 3) &&
			 atomic_read(&ctx[i]->fence_irqs) - ctx_irqs == 3,
			 "ctx %u: %d fence interrupts for 3 fences", ctx[i]->id,
			 atomic_read(&ctx[i]->fence_irqs) - ctx_irqs);
		ST_CHECK(st, st_counted(&vgpu->vec[v].count, vec_irqs, 3),
			 "ctx %u: %d interrupts on vector %u", ctx[i]->id,
			 atomic_read(&vgpu->vec[v].count) - vec_irqs, v);
		ST_CHECK(st, v == 0 || atomic_read(&vgpu->vec[0].count) == fault_irqs,
			 "fault vector fired for a fence");
	}
	ST_CHECK(st, tvgpu_rd(vgpu, TVGPU_REG_INT_STATUS) == 0, "INT_STATUS %#x not acknowledged",
		 tvgpu_rd(vgpu, TVGPU_REG_INT_STATUS));
	return 0;
}

/* The blocking WAIT register: DONE, TIMEOUT (one 100 ms read), INVALID. */
static int st_wait_register(struct tvgpu_st *st)
{
	struct tvgpu_device *vgpu = st->vgpu;
	struct tvgpu_context *ctx = st_ctx(st, TVGPU_LOC_SYS, 16, true);
	struct tvgpu_packet p = pkt_spin(2000, 1);
	u32 r, unused;
	u64 seq;
	int err;

	if (!ctx)
		return -EINVAL;
	err = tvgpu_ctx_submit(ctx, &p, 1, &seq);
	if (err)
		return st_describe(st, ctx, "submit", err);
	tvgpu_wr(vgpu, TVGPU_REG_WAIT_CTX, ctx->id);
	tvgpu_wr(vgpu, TVGPU_REG_WAIT_VALUE, lower_32_bits(seq));
	for (r = TVGPU_WAIT_TIMEOUT, err = 0; r == TVGPU_WAIT_TIMEOUT && err < 50; err++)
		r = tvgpu_rd(vgpu, TVGPU_REG_WAIT);
	ST_CHECK(st, r == TVGPU_WAIT_DONE, "WAIT returned %u, expected DONE", r);
	ST_CHECK(st, tvgpu_rd64(vgpu, TVGPU_CTX_REG(ctx->id, TVGPU_CTX_FENCE_LO)) == seq,
		 "CTX_FENCE %llu after WAIT, expected %llu",
		 tvgpu_rd64(vgpu, TVGPU_CTX_REG(ctx->id, TVGPU_CTX_FENCE_LO)), seq);
	tvgpu_wr(vgpu, TVGPU_REG_WAIT_VALUE, lower_32_bits(seq + 1));
	r = tvgpu_rd(vgpu, TVGPU_REG_WAIT);
	ST_CHECK(st, r == TVGPU_WAIT_TIMEOUT, "WAIT for a fence never sent returned %u", r);
	unused = find_first_zero_bit(&vgpu->ctx_used, vgpu->num_ctx);
	if (unused < vgpu->num_ctx) {
		tvgpu_wr(vgpu, TVGPU_REG_WAIT_CTX, unused);
		r = tvgpu_rd(vgpu, TVGPU_REG_WAIT);
		ST_CHECK(st, r == TVGPU_WAIT_INVALID, "WAIT on disabled context %u returned %u",
			 unused, r);
	}
	err = tvgpu_ctx_wait(ctx, seq, ST_TIMEOUT_NS, false);
	if (err)
		return st_describe(st, ctx, "wait", err);
	return 0;
}

static u32 st_crc32(const u8 *p, size_t len)
{
	u32 crc = ~0U;
	int k;

	while (len--) {
		crc ^= *p++;
		for (k = 0; k < 8; k++)
			crc = (crc >> 1) ^ (0xedb88320U & -(crc & 1));
	}
	return ~crc;
}

/* Built-in kernels, checked against the CPU (floats as exact bit patterns: no FPU here). */
static int st_kernels(struct tvgpu_st *st)
{
	/* f32 bits */
	enum { F0 = 0, F1 = 0x3f800000, F2 = 0x40000000, F3 = 0x40400000, F4 = 0x40800000,
	       F5 = 0x40a00000 };
	static const u32 a[4] = { F1, F2, F3, F4 }, ident[4] = { F1, F0, F0, F1 };
	struct tvgpu_context *ctx = st_ctx(st, TVGPU_LOC_VRAM, 16, true);
	struct tvgpu_bo *bo;
	struct tvgpu_packet p[7];
	u32 data[64], c[4], crc, i;
	u64 va = 0, sum = 0, got, t0, t1;

	if (!ctx)
		return -EINVAL;
	bo = st_buf(st, ctx, TVGPU_LOC_SYS, PAGE_SIZE, true, &va);
	if (!bo)
		return -EINVAL;
	/* 0x000: data (256 bytes); 0x100: crc; 0x108: sum; 0x200 x, 0x300 y; 0x400 A, B, C; 0x500 ts */
	for (i = 0; i < ARRAY_SIZE(data); i++) {
		data[i] = 0x01000193U * i ^ 0xdeadbeefU;
		sum += data[i];
	}
	tvgpu_mem_write(bo->mem, 0, data, sizeof(data));
	for (i = 0; i < 16; i++) {
		u32 x = F1, y = F3;

		tvgpu_mem_write(bo->mem, 0x200 + i * 4, &x, 4);
		tvgpu_mem_write(bo->mem, 0x300 + i * 4, &y, 4);
	}
	tvgpu_mem_write(bo->mem, 0x400, a, sizeof(a));
	tvgpu_mem_write(bo->mem, 0x410, ident, sizeof(ident));

	p[0] = pkt(TVGPU_OP_TIMESTAMP, 0, va + 0x500, 0, 0);
	p[1] = pkt(TVGPU_OP_DISPATCH, TVGPU_KERNEL_CRC32, sizeof(data), va, va + 0x100);
	p[2] = pkt(TVGPU_OP_DISPATCH, TVGPU_KERNEL_REDUCE_SUM, ARRAY_SIZE(data), va, va + 0x108);
	p[3] = pkt(TVGPU_OP_DISPATCH, TVGPU_KERNEL_SAXPY, 16, F2, va + 0x200);
	p[3].args[3] = va + 0x300;
	p[4] = pkt(TVGPU_OP_DISPATCH, TVGPU_KERNEL_SGEMM, 2, 2, 2);
	p[4].args[3] = va + 0x400;
	p[4].args[4] = va + 0x410;
	p[4].args[5] = va + 0x420;
	p[5] = pkt_spin(200, 2);
	p[6] = pkt(TVGPU_OP_TIMESTAMP, 0, va + 0x508, 0, 0);
	ST_TRY(st_run(st, ctx, p, 7));

	crc = st_crc32((const u8 *)data, sizeof(data));
	tvgpu_mem_read(bo->mem, 0x100, &i, 4);
	ST_CHECK(st, i == crc, "crc32 %#x, CPU says %#x", i, crc);
	got = tvgpu_mem_rd64(bo->mem, 0x108);
	ST_CHECK(st, got == sum, "reduce_sum %#llx, CPU says %#llx", got, sum);
	ST_TRY(st_expect_u32(st, bo, 0x300, 64, F5, "saxpy 2*1+3"));
	tvgpu_mem_read(bo->mem, 0x420, c, sizeof(c));
	ST_CHECK(st, !memcmp(c, a, sizeof(c)), "sgemm A*I: %#x %#x %#x %#x", c[0], c[1], c[2], c[3]);
	t0 = tvgpu_mem_rd64(bo->mem, 0x500);
	t1 = tvgpu_mem_rd64(bo->mem, 0x508);
	ST_CHECK(st, t0 && t1 >= t0 + 2 * 200 * NSEC_PER_USEC / 2,
		 "timestamps %llu, %llu around 2 x 200 us of spinning", t0, t1);
	return 0;
}

/* Faults: each stops the context with the right record and an interrupt; recovery works. */
static int st_faults(struct tvgpu_st *st)
{
	struct tvgpu_device *vgpu = st->vgpu;
	struct tvgpu_context *ctx = st_ctx(st, TVGPU_LOC_VRAM, 16, true);
	struct tvgpu_bo *bo, *ro;
	struct tvgpu_packet p;
	u64 va = 0, rova = 0, seq_lost, slot;
	int err;

	if (!ctx)
		return -EINVAL;
	bo = st_buf(st, ctx, TVGPU_LOC_SYS, PAGE_SIZE, true, &va);
	ro = bo ? st_buf(st, ctx, TVGPU_LOC_SYS, PAGE_SIZE, false, &rova) : NULL;
	if (!ro)
		return -EINVAL;

	/* Not present: the unmapped guard page after a buffer. */
	p = pkt_copy(va + PAGE_SIZE, va, 64);
	ST_TRY(st_expect_fault(st, ctx, &p, 1, TVGPU_FAULT_NOT_PRESENT, va + PAGE_SIZE));
	seq_lost = ctx->seqno;
	ST_TRY(st_recover(st, ctx, va, 0x1));
	err = tvgpu_ctx_wait(ctx, seq_lost, 0, false);
	ST_CHECK(st, err == -ECANCELED, "wait for work dropped by recovery: %d", err);

	/* Write protect. */
	p = pkt_fill(rova, 64, 0xbad);
	ST_TRY(st_expect_fault(st, ctx, &p, 1, TVGPU_FAULT_WRITE_PROTECT, rova));
	ST_TRY(st_recover(st, ctx, va, 0x2));

	/* DMA domain: system memory far beyond RAM, and the register BAR (an MMIO hole). */
	ST_TRY(tvgpu_pt_set(ctx, ST_HOLE_VA, TVGPU_PTE_ADDR_MASK | TVGPU_PTE_PRESENT |
			    TVGPU_PTE_WRITABLE));
	ST_TRY(tvgpu_pt_set(ctx, ST_HOLE_VA + PAGE_SIZE,
			    (pci_resource_start(vgpu->pdev, TVGPU_PCI_BAR_REGS) & TVGPU_PTE_ADDR_MASK) |
			    TVGPU_PTE_PRESENT | TVGPU_PTE_WRITABLE));
	/* VRAM range: the first page past this vGPU's VRAM. */
	ST_TRY(tvgpu_pt_set(ctx, ST_HOLE_VA + 2 * PAGE_SIZE,
			    vgpu->vram_size | TVGPU_PTE_VRAM | TVGPU_PTE_PRESENT | TVGPU_PTE_WRITABLE));
	/* A reserved bit. */
	ST_TRY(tvgpu_pt_set(ctx, ST_HOLE_VA + 3 * PAGE_SIZE,
			    tvgpu_mem_pte_addr(bo->mem, 0) | TVGPU_PTE_PRESENT | (1ULL << 3)));
	/* The entries land before the TLB flush. */
	wmb();
	tvgpu_ctx_wr(vgpu, ctx->id, TVGPU_CTX_TLB_INVALIDATE, 1);
	p = pkt_fill(ST_HOLE_VA, 64, 0xbad);
	ST_TRY(st_expect_fault(st, ctx, &p, 1, TVGPU_FAULT_DMA_DOMAIN, ~0ULL));
	ST_TRY(st_recover(st, ctx, va, 0x3));
	p = pkt_copy(ST_HOLE_VA + PAGE_SIZE, va, 64);
	ST_TRY(st_expect_fault(st, ctx, &p, 1, TVGPU_FAULT_DMA_DOMAIN, ~0ULL));
	ST_TRY(st_recover(st, ctx, va, 0x4));
	p = pkt_fill(ST_HOLE_VA + 2 * PAGE_SIZE, 64, 0xbad);
	ST_TRY(st_expect_fault(st, ctx, &p, 1, TVGPU_FAULT_VRAM_RANGE, ~0ULL));
	ST_TRY(st_recover(st, ctx, va, 0x5));
	p = pkt_fill(ST_HOLE_VA + 3 * PAGE_SIZE, 64, 0xbad);
	ST_TRY(st_expect_fault(st, ctx, &p, 1, TVGPU_FAULT_BAD_PTE, ST_HOLE_VA + 3 * PAGE_SIZE));
	ST_TRY(st_recover(st, ctx, va, 0x6));

	/* Bad opcode: the fault address is the packet's. */
	slot = ctx->tail % ctx->ring_entries;
	p = pkt(0x7f, 0, 0, 0, 0);
	ST_TRY(st_expect_fault(st, ctx, &p, 1, TVGPU_FAULT_BAD_OPCODE,
			       TVGPU_RING_VA + slot * TVGPU_PACKET_SIZE));
	ST_TRY(st_recover(st, ctx, va, 0x7));
	ST_TRY(st_expect_u32(st, bo, 0, 8, 0x7, "fill after the last recovery"));
	ST_CHECK(st, ctx->faults == 7, "%u faults counted, expected 7", ctx->faults);
	ST_CHECK(st, !(tvgpu_rd(vgpu, TVGPU_REG_STATUS) & TVGPU_STATUS_FAULTED),
		 "STATUS.FAULTED after recovery");
	return 0;
}

/* Two contexts, the same VAs, different memory: neither sees the other's. */
static int st_isolation(struct tvgpu_st *st)
{
	const u64 x = TVGPU_VA_USER_START + 0x100000, y = TVGPU_VA_USER_START + 0x200000;
	struct tvgpu_context *a = st_ctx(st, TVGPU_LOC_SYS, 16, true);
	struct tvgpu_context *b = a ? st_ctx(st, TVGPU_LOC_VRAM, 16, false) : NULL;
	struct tvgpu_bo *abo, *bbo, *asecret;
	struct tvgpu_packet p;
	u64 va;

	if (!b)
		return -EINVAL;
	ST_CHECK(st, tvgpu_pt_root_reg(a) != tvgpu_pt_root_reg(b), "shared page-table root");
	va = x;
	abo = st_buf(st, a, TVGPU_LOC_SYS, PAGE_SIZE, true, &va);
	va = x;
	bbo = abo ? st_buf(st, b, TVGPU_LOC_SYS, PAGE_SIZE, true, &va) : NULL;
	va = y;
	asecret = bbo ? st_buf(st, a, TVGPU_LOC_VRAM, PAGE_SIZE, true, &va) : NULL;
	if (!asecret)
		return -EINVAL;

	p = pkt_fill(x, PAGE_SIZE, 0xaaaaaaaa);
	ST_TRY(st_run(st, a, &p, 1));
	p = pkt_fill(x, PAGE_SIZE, 0xbbbbbbbb);
	ST_TRY(st_run(st, b, &p, 1));
	p = pkt_fill(y, PAGE_SIZE, 0x5ec7e7);
	ST_TRY(st_run(st, a, &p, 1));
	ST_TRY(st_expect_u32(st, abo, 0, PAGE_SIZE, 0xaaaaaaaa, "context A's buffer"));
	ST_TRY(st_expect_u32(st, bbo, 0, PAGE_SIZE, 0xbbbbbbbb, "context B's buffer"));
	/* B reaching for A's VA: not present in B's space. */
	p = pkt_copy(y, x, 64);
	ST_TRY(st_expect_fault(st, b, &p, 1, TVGPU_FAULT_NOT_PRESENT, y));
	ST_TRY(st_expect_u32(st, bbo, 0, PAGE_SIZE, 0xbbbbbbbb, "context B's buffer after the fault"));
	ST_TRY(st_expect_u32(st, asecret, 0, PAGE_SIZE, 0x5ec7e7, "context A's secret"));
	/* A is not disturbed by B's fault. */
	ST_CHECK(st, !a->faulted, "context A stopped by B's fault");
	p = pkt_copy(y, x, 64);
	ST_TRY(st_run(st, a, &p, 1));
	ST_TRY(st_expect_u32(st, abo, 0, 64, 0x5ec7e7, "context A's copy"));
	return 0;
}

/* A faulting job in one context while another context's work goes on. */
static int st_fault_while_busy(struct tvgpu_st *st)
{
	struct tvgpu_context *a = st_ctx(st, TVGPU_LOC_VRAM, 16, true);
	struct tvgpu_context *b = a ? st_ctx(st, TVGPU_LOC_SYS, 16, true) : NULL;
	struct tvgpu_bo *abo, *bbo;
	struct tvgpu_packet pa[2], pb;
	u64 ava = 0, bva = 0, sa1, sa2, sb;
	int err;

	if (!b)
		return -EINVAL;
	abo = st_buf(st, a, TVGPU_LOC_VRAM, PAGE_SIZE, true, &ava);
	bbo = abo ? st_buf(st, b, TVGPU_LOC_SYS, PAGE_SIZE, true, &bva) : NULL;
	if (!bbo)
		return -EINVAL;
	pa[0] = pkt_spin(3000, 2);
	pa[1] = pkt_fill(ava, 64, 0xa1);
	pb = pkt_copy(ST_HOLE_VA, bva, 64);
	err = tvgpu_ctx_submit(a, pa, 2, &sa1);
	if (!err)
		err = tvgpu_ctx_submit(b, &pb, 1, &sb);
	pa[0] = pkt_spin(1000, 1);
	pa[1] = pkt_fill(ava + 64, 64, 0xa2);
	if (!err)
		err = tvgpu_ctx_submit(a, pa, 2, &sa2);
	if (err)
		return st_fail(st, "submit: %d", err);
	err = tvgpu_ctx_wait(b, sb, ST_TIMEOUT_NS, false);
	ST_CHECK(st, err == -EIO, "faulting job: wait returned %d, expected -EIO", err);
	ST_CHECK(st, b->fault_code == TVGPU_FAULT_NOT_PRESENT, "fault %s",
		 tvgpu_fault_name(b->fault_code));
	err = tvgpu_ctx_wait(a, sa1, ST_TIMEOUT_NS, false);
	if (!err)
		err = tvgpu_ctx_wait(a, sa2, ST_TIMEOUT_NS, false);
	if (err)
		return st_describe(st, a, "the other context's work", err);
	ST_TRY(st_expect_u32(st, abo, 0, 64, 0xa1, "first job"));
	ST_TRY(st_expect_u32(st, abo, 64, 64, 0xa2, "job after the fault"));
	ST_TRY(st_recover(st, b, bva, 0xb));
	return 0;
}

/*
 * Function-level reset: VRAM scrubbed, registers at power-on values, and interrupts work
 * again afterwards (the MSI-X table is restored).
 */
static int st_reset(struct tvgpu_st *st)
{
	struct tvgpu_device *vgpu = st->vgpu;
	struct tvgpu_bo *bo = st_bo(st, TVGPU_LOC_VRAM, PAGE_SIZE);
	struct tvgpu_context *ctx;
	struct tvgpu_packet p = pkt(TVGPU_OP_NOP, 0, 0, 0, 0);
	u32 v = 0xfeedf00d, irqs, i;

	if (!bo)
		return -EINVAL;
	ST_CHECK(st, !vgpu->ctx_used, "contexts in use: %#lx", vgpu->ctx_used);
	tvgpu_mem_write(bo->mem, 128, &v, 4);
	tvgpu_wr(vgpu, TVGPU_REG_INT_MASK, 0x5);
	ST_TRY(tvgpu_hw_reset(vgpu));
	tvgpu_mem_read(bo->mem, 128, &v, 4);
	ST_CHECK(st, v == 0, "VRAM holds %#x after reset", v);
	ST_CHECK(st, tvgpu_rd(vgpu, TVGPU_REG_STATUS) == TVGPU_STATUS_READY, "STATUS %#x",
		 tvgpu_rd(vgpu, TVGPU_REG_STATUS));
	ST_CHECK(st, tvgpu_rd(vgpu, TVGPU_REG_FAULT_COUNT) == 0 &&
		 tvgpu_rd(vgpu, TVGPU_REG_FAULT_CODE) == 0, "fault record kept across reset");
	ST_CHECK(st, tvgpu_rd(vgpu, TVGPU_REG_INT_STATUS) == 0, "INT_STATUS %#x",
		 tvgpu_rd(vgpu, TVGPU_REG_INT_STATUS));
	for (i = 0; i < vgpu->num_ctx; i++)
		ST_CHECK(st, tvgpu_ctx_rd(vgpu, i, TVGPU_CTX_STATUS) == 0 &&
			 tvgpu_ctx_rd(vgpu, i, TVGPU_CTX_CONTROL) == 0 &&
			 tvgpu_ctx_rd(vgpu, i, TVGPU_CTX_RING_HEAD) == 0,
			 "context %u not at power-on state", i);
	/* Interrupts after the reset. */
	ctx = st_ctx(st, TVGPU_LOC_VRAM, 16, true);
	if (!ctx)
		return -EINVAL;
	irqs = atomic_read(&ctx->fence_irqs);
	ST_TRY(st_run(st, ctx, &p, 1));
	ST_CHECK(st, st_counted(&ctx->fence_irqs, irqs, 1), "no fence interrupt after the reset");
	return 0;
}

struct st_case {
	const char *name;
	int (*run)(struct tvgpu_st *st);
};

static const struct st_case st_cases[] = {
	{ "registers", st_registers },
	{ "msix", st_msix },
	{ "vram_aperture", st_vram_aperture },
	{ "page_tables_sysmem", st_page_tables_sysmem },
	{ "page_tables_vram", st_page_tables_vram },
	{ "ring_wrap", st_ring_wrap },
	{ "fence_irq", st_fence_irq },
	{ "wait_register", st_wait_register },
	{ "kernels", st_kernels },
	{ "faults", st_faults },
	{ "isolation", st_isolation },
	{ "fault_while_busy", st_fault_while_busy },
	{ "reset", st_reset },
};

void tvgpu_selftest(struct tvgpu_device *vgpu)
{
	struct device *dev = tvgpu_dev(vgpu);
	struct tvgpu_st *st;
	unsigned int i, passed = 0;
	ktime_t t0 = ktime_get();

	st = kzalloc(sizeof(*st), GFP_KERNEL);
	if (!st)
		return;
	st->vgpu = vgpu;
	for (i = 0; i < ARRAY_SIZE(st_cases); i++) {
		ktime_t t = ktime_get();
		int err;

		st->msg[0] = 0;
		err = st_cases[i].run(st);
		st_cleanup(st);
		/* Everything a case allocated went back. */
		if (vgpu->vram_free != vgpu->vram_pages || vgpu->ctx_used)
			err = st_fail(st, "leaked %lu VRAM pages, contexts %#lx",
				      vgpu->vram_pages - vgpu->vram_free, vgpu->ctx_used);
		if (!err) {
			passed++;
			dev_info(dev, "selftest %s ok (%lld ms)\n", st_cases[i].name,
				 ktime_ms_delta(ktime_get(), t));
		} else {
			dev_err(dev, "selftest %s FAIL: %s\n", st_cases[i].name,
				st->msg[0] ? st->msg : "error");
		}
	}
	kfree(st);
	/* Leave the device as a fresh one: no fault record, VRAM scrubbed. */
	if (tvgpu_hw_reset(vgpu))
		dev_err(dev, "selftest: the final reset failed\n");
	tvgpu_free_zombies(vgpu);
	dev_info(dev, "selftest: %u/%zu passed (%lld ms)\n", passed, ARRAY_SIZE(st_cases),
		 ktime_ms_delta(ktime_get(), t0));
}
