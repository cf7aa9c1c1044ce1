// SPDX-License-Identifier: GPL-2.0-only OR MIT
/*
 * tessera_vgpu: GPU contexts.
 *
 * A context owns one of the device's context register blocks, a GPU address space (its own
 * page tables), a ring of packets mapped read-only at TVGPU_RING_VA and a fence page mapped
 * at TVGPU_FENCE_VA. Every submission ends with a FENCE packet carrying the next sequence
 * number and asking for an interrupt; the interrupt handler reads CTX_FENCE and wakes the
 * waiters. A fault stops the context (the device keeps its other contexts running); waits
 * then fail with -EIO until the owner recovers it, which drops the work not yet done.
 */
#include <linux/bitops.h>
#include <linux/err.h>
#include <linux/jiffies.h>
#include <linux/ktime.h>
#include <linux/moduleparam.h>
#include <linux/sched.h>
#include <linux/string.h>
#include <linux/slab.h>

#include "tvgpu.h"

/* How often a waiter re-reads the fence register itself (a lost interrupt costs this much). */
#define TVGPU_POLL_SLICE	(HZ / 10)
/* How long unmap/destroy wait for the context's work before giving up. */
#define TVGPU_IDLE_TIMEOUT_NS	(5LL * NSEC_PER_SEC)

/* Under irq_lock: refresh the completed fence from the register. */
static void tvgpu_ctx_update_fence(struct tvgpu_context *ctx)
{
	u64 f = tvgpu_rd64(ctx->vgpu, TVGPU_CTX_REG(ctx->id, TVGPU_CTX_FENCE_LO));

	if (f > ctx->completed)
		ctx->completed = f;
}

/* Under irq_lock: notice a fault of this context. */
static void tvgpu_ctx_update_fault(struct tvgpu_context *ctx)
{
	struct tvgpu_device *vgpu = ctx->vgpu;
	u32 status = tvgpu_ctx_rd(vgpu, ctx->id, TVGPU_CTX_STATUS);

	if (!(status & TVGPU_CTX_STATUS_FAULTED) || ctx->faulted)
		return;
	ctx->faulted = true;
	ctx->fault_code = tvgpu_ctx_rd(vgpu, ctx->id, TVGPU_CTX_FAULT_CODE);
	ctx->fault_addr = tvgpu_rd64(vgpu, TVGPU_CTX_REG(ctx->id, TVGPU_CTX_FAULT_ADDR_LO));
	ctx->faults++;
	dev_info_ratelimited(tvgpu_dev(vgpu), "context %u stopped on a fault: %s (%u) at %#llx\n",
			     ctx->id, tvgpu_fault_name(ctx->fault_code), ctx->fault_code,
			     ctx->fault_addr);
}

/* Interrupt handler, under irq_lock: INT_STATUS.FAULT. */
void tvgpu_irq_faults(struct tvgpu_device *vgpu)
{
	u32 id;

	for (id = 0; id < vgpu->num_ctx; id++) {
		struct tvgpu_context *ctx = vgpu->ctx[id];

		if (!ctx)
			continue;
		tvgpu_ctx_update_fence(ctx);
		tvgpu_ctx_update_fault(ctx);
		wake_up(&ctx->wq);
	}
}

/* Interrupt handler, under irq_lock: a fence interrupt of context id. */
void tvgpu_irq_fence(struct tvgpu_device *vgpu, u32 id)
{
	struct tvgpu_context *ctx = id < vgpu->num_ctx ? vgpu->ctx[id] : NULL;

	if (!ctx)
		return;
	atomic_inc(&ctx->fence_irqs);
	tvgpu_ctx_update_fence(ctx);
	wake_up(&ctx->wq);
}

void tvgpu_wake_all(struct tvgpu_device *vgpu)
{
	unsigned long flags;
	u32 id;

	spin_lock_irqsave(&vgpu->irq_lock, flags);
	for (id = 0; id < vgpu->num_ctx; id++)
		if (vgpu->ctx[id])
			wake_up(&vgpu->ctx[id]->wq);
	spin_unlock_irqrestore(&vgpu->irq_lock, flags);
}

/*
 * Programs the context's registers (reset, page-table root, ring, tail shadow, vector) and
 * enables it; returns the fence value the device kept.
 */
static u64 tvgpu_ctx_program(struct tvgpu_context *ctx)
{
	struct tvgpu_device *vgpu = ctx->vgpu;
	u32 id = ctx->id;

	tvgpu_ctx_wr(vgpu, id, TVGPU_CTX_CONTROL, TVGPU_CTX_CONTROL_RESET);
	ctx->tail = 0;
	tvgpu_mem_wr64(ctx->fence, TVGPU_TAIL_SHADOW_OFF, 0);
	/* Page tables, ring and shadow are in memory before the device may look at them. */
	wmb();
	tvgpu_ctx_wr64(vgpu, id, TVGPU_CTX_PT_ROOT_LO, tvgpu_pt_root_reg(ctx));
	tvgpu_ctx_wr64(vgpu, id, TVGPU_CTX_RING_BASE_LO, TVGPU_RING_VA);
	tvgpu_ctx_wr(vgpu, id, TVGPU_CTX_RING_SIZE, ctx->ring_entries);
	tvgpu_ctx_wr64(vgpu, id, TVGPU_CTX_TAIL_ADDR_LO,
		       ctx->doorbell ? TVGPU_FENCE_VA + TVGPU_TAIL_SHADOW_OFF : 0);
	tvgpu_ctx_wr(vgpu, id, TVGPU_CTX_IRQ_VECTOR, tvgpu_ctx_vector(vgpu, id));
	tvgpu_ctx_wr(vgpu, id, TVGPU_CTX_TLB_INVALIDATE, 1);
	/* With suppression the device writes the hint next to the tail (zeroed above). */
	tvgpu_ctx_wr(vgpu, id, TVGPU_CTX_CONTROL,
		     TVGPU_CTX_CONTROL_ENABLE |
		     (ctx->suppress ? TVGPU_CTX_CONTROL_SUPPRESS : 0));
	return tvgpu_rd64(vgpu, TVGPU_CTX_REG(id, TVGPU_CTX_FENCE_LO));
}

static int tvgpu_ctx_map_mem(struct tvgpu_context *ctx, struct tvgpu_mem *mem, u64 va,
			     bool writable)
{
	unsigned long i;
	int err;

	for (i = 0; i < mem->npages; i++) {
		u64 e = tvgpu_mem_pte_addr(mem, i) | TVGPU_PTE_PRESENT;

		if (writable)
			e |= TVGPU_PTE_WRITABLE;
		err = tvgpu_pt_set(ctx, va + ((u64)i << PAGE_SHIFT), e);
		if (err)
			return err;
	}
	return 0;
}

/*
 * A context in loc memory (page tables, ring, fence page) with a ring of ring_entries packets
 * (0 = the default), submitting through the doorbell and tail shadow when the device has them
 * and doorbell is set, else through CTX_RING_TAIL.
 */
struct tvgpu_context *tvgpu_ctx_create(struct tvgpu_device *vgpu, enum tvgpu_loc loc,
				       u32 ring_entries, bool doorbell)
{
	struct tvgpu_context *ctx;
	unsigned long id;
	u64 fence;
	int err;

	if (!ring_entries)
		ring_entries = min_t(u32, TVGPU_RING_ENTRIES, vgpu->max_ring);
	if (!is_power_of_2(ring_entries) || ring_entries < 2 || ring_entries > vgpu->max_ring)
		return ERR_PTR(-EINVAL);

	spin_lock_irq(&vgpu->irq_lock);
	id = find_first_zero_bit(&vgpu->ctx_used, vgpu->num_ctx);
	if (id < vgpu->num_ctx)
		set_bit(id, &vgpu->ctx_used);
	spin_unlock_irq(&vgpu->irq_lock);
	if (id >= vgpu->num_ctx)
		return ERR_PTR(-EBUSY);

	ctx = kzalloc(sizeof(*ctx), GFP_KERNEL);
	if (!ctx) {
		err = -ENOMEM;
		goto release_id;
	}
	ctx->vgpu = vgpu;
	ctx->id = id;
	ctx->loc = loc;
	ctx->doorbell = doorbell && (vgpu->caps & TVGPU_CAP_TAIL_SHADOW);
	ctx->suppress = ctx->doorbell && (vgpu->caps & TVGPU_CAP_DOORBELL_SUPPRESS);
	ctx->ring_entries = ring_entries;
	ctx->next_va = TVGPU_VA_USER_START;
	mutex_init(&ctx->lock);
	init_waitqueue_head(&ctx->wq);
	INIT_LIST_HEAD(&ctx->mappings);
	atomic_set(&ctx->fence_irqs, 0);

	err = -ENOMEM;
	ctx->root = tvgpu_pt_create(vgpu, loc, TVGPU_PTE_LEVELS);
	if (!ctx->root)
		goto free;
	ctx->ring = tvgpu_mem_alloc(vgpu, loc, (u64)ring_entries * TVGPU_PACKET_SIZE);
	if (IS_ERR(ctx->ring)) {
		err = PTR_ERR(ctx->ring);
		goto free;
	}
	ctx->fence = tvgpu_mem_alloc(vgpu, loc, PAGE_SIZE);
	if (IS_ERR(ctx->fence)) {
		err = PTR_ERR(ctx->fence);
		goto free;
	}
	err = tvgpu_ctx_map_mem(ctx, ctx->ring, TVGPU_RING_VA, false);
	if (!err)
		err = tvgpu_ctx_map_mem(ctx, ctx->fence, TVGPU_FENCE_VA, true);
	if (err)
		goto free;

	fence = tvgpu_ctx_program(ctx);
	ctx->seqno = fence;
	ctx->completed = fence;

	spin_lock_irq(&vgpu->irq_lock);
	vgpu->ctx[id] = ctx;
	spin_unlock_irq(&vgpu->irq_lock);
	return ctx;

free:
	tvgpu_pt_destroy(vgpu, ctx->root);
	if (!IS_ERR_OR_NULL(ctx->ring))
		tvgpu_mem_free(vgpu, ctx->ring);
	if (!IS_ERR_OR_NULL(ctx->fence))
		tvgpu_mem_free(vgpu, ctx->fence);
	kfree(ctx);
release_id:
	spin_lock_irq(&vgpu->irq_lock);
	clear_bit(id, &vgpu->ctx_used);
	spin_unlock_irq(&vgpu->irq_lock);
	return ERR_PTR(err);
}

/* Frees a stopped context's memory and gives its id back. */
static void tvgpu_ctx_free(struct tvgpu_context *ctx)
{
	struct tvgpu_device *vgpu = ctx->vgpu;
	struct tvgpu_mapping *m, *tmp;

	list_for_each_entry_safe(m, tmp, &ctx->mappings, node) {
		list_del(&m->node);
		tvgpu_bo_put(m->bo);
		kfree(m);
	}
	tvgpu_pt_destroy(vgpu, ctx->root);
	tvgpu_mem_free(vgpu, ctx->ring);
	tvgpu_mem_free(vgpu, ctx->fence);

	spin_lock_irq(&vgpu->irq_lock);
	clear_bit(ctx->id, &vgpu->ctx_used);
	spin_unlock_irq(&vgpu->irq_lock);
	kfree(ctx);
}

/*
 * Stops the context and frees it. The device must not be dead, or the caller holds
 * vgpu->remove_sem for reading and the device is dead (then the hardware is left alone).
 * Work still running after TVGPU_IDLE_TIMEOUT_NS makes the context a zombie: its memory and
 * id are kept until the device is reset (tvgpu_free_zombies), since the device may still
 * write that memory.
 */
void tvgpu_ctx_destroy(struct tvgpu_context *ctx)
{
	struct tvgpu_device *vgpu = ctx->vgpu;
	bool busy = false;

	if (!READ_ONCE(vgpu->dead)) {
		/* Let work in flight finish before its memory goes back. */
		busy = tvgpu_ctx_wait(ctx, ctx->seqno, TVGPU_IDLE_TIMEOUT_NS, false) == -ETIME;
		tvgpu_ctx_wr(vgpu, ctx->id, TVGPU_CTX_CONTROL, TVGPU_CTX_CONTROL_RESET);
	}
	spin_lock_irq(&vgpu->irq_lock);
	vgpu->ctx[ctx->id] = NULL;
	if (busy)
		list_add_tail(&ctx->zombie, &vgpu->zombies);
	spin_unlock_irq(&vgpu->irq_lock);
	if (busy)
		dev_warn(tvgpu_dev(vgpu),
			 "context %u closed with work still running: its memory is kept until the device is reset\n",
			 ctx->id);
	else
		tvgpu_ctx_free(ctx);
}

/* After a device reset (or with the device gone): free the zombie contexts. */
void tvgpu_free_zombies(struct tvgpu_device *vgpu)
{
	struct tvgpu_context *ctx, *tmp;
	LIST_HEAD(list);

	spin_lock_irq(&vgpu->irq_lock);
	list_splice_init(&vgpu->zombies, &list);
	spin_unlock_irq(&vgpu->irq_lock);
	list_for_each_entry_safe(ctx, tmp, &list, zombie) {
		list_del(&ctx->zombie);
		tvgpu_ctx_free(ctx);
	}
}

/* Maps [bo_offset, bo_offset + size) of bo at *va (0: the driver picks; returned in *va). */
int tvgpu_ctx_map(struct tvgpu_context *ctx, struct tvgpu_bo *bo, u64 bo_offset, u64 size,
		  u64 *va, bool writable)
{
	struct tvgpu_mapping *m, *it;
	u64 start = *va, i;
	int err;

	if (!size || !PAGE_ALIGNED(size) || !PAGE_ALIGNED(bo_offset) ||
	    bo_offset >= bo->mem->size || size > bo->mem->size - bo_offset)
		return -EINVAL;
	m = kzalloc(sizeof(*m), GFP_KERNEL);
	if (!m)
		return -ENOMEM;

	mutex_lock(&ctx->lock);
	if (!start) {
		/* Pick: the next free range above the last one picked, past any in the way. */
		bool moved;

		start = ctx->next_va;
		do {
			moved = false;
			list_for_each_entry(it, &ctx->mappings, node)
				if (start < it->va + it->size && it->va < start + size) {
					start = it->va + it->size + PAGE_SIZE;
					moved = true;
				}
		} while (moved && start < TVGPU_VA_USER_END);
	}
	err = -EINVAL;
	if (!PAGE_ALIGNED(start) || start < TVGPU_VA_USER_START || start >= TVGPU_VA_USER_END ||
	    size > TVGPU_VA_USER_END - start)
		goto unlock;
	err = -EEXIST;
	list_for_each_entry(it, &ctx->mappings, node)
		if (start < it->va + it->size && it->va < start + size)
			goto unlock;

	for (i = 0; i < size >> PAGE_SHIFT; i++) {
		u64 e = tvgpu_mem_pte_addr(bo->mem, (bo_offset >> PAGE_SHIFT) + i) |
			TVGPU_PTE_PRESENT;

		if (writable)
			e |= TVGPU_PTE_WRITABLE;
		err = tvgpu_pt_set(ctx, start + (i << PAGE_SHIFT), e);
		if (err) {
			while (i--)
				tvgpu_pt_set(ctx, start + (i << PAGE_SHIFT), 0);
			goto unlock;
		}
	}
	/* New entries only: nothing stale can be cached, but flush anyway (cheap, and safe). */
	wmb();
	tvgpu_ctx_wr(ctx->vgpu, ctx->id, TVGPU_CTX_TLB_INVALIDATE, 1);

	tvgpu_bo_get(bo);
	m->bo = bo;
	m->va = start;
	m->size = size;
	m->bo_offset = bo_offset;
	m->writable = writable;
	list_add_tail(&m->node, &ctx->mappings);
	if (start + size + PAGE_SIZE > ctx->next_va)
		/* Leave an unmapped guard page after each picked range. */
		ctx->next_va = min(start + size + PAGE_SIZE, TVGPU_VA_USER_END);
	*va = start;
	m = NULL;
	err = 0;
unlock:
	mutex_unlock(&ctx->lock);
	kfree(m);
	return err;
}

/*
 * Removes the mapping that starts at va, once the context's submitted work is done (or the
 * context is stopped): the GPU never touches memory that has gone back. -EBUSY if the work
 * does not finish in time.
 */
int tvgpu_ctx_unmap(struct tvgpu_context *ctx, u64 va)
{
	struct tvgpu_mapping *m, *found = NULL;
	u64 i;
	int err;

	mutex_lock(&ctx->lock);
	list_for_each_entry(m, &ctx->mappings, node)
		if (m->va == va) {
			found = m;
			break;
		}
	err = -ENOENT;
	if (!found)
		goto unlock;
	err = tvgpu_ctx_wait(ctx, ctx->seqno, TVGPU_IDLE_TIMEOUT_NS, false);
	if (err == -ETIME) {
		err = -EBUSY;
		goto unlock;
	}
	for (i = 0; i < found->size >> PAGE_SHIFT; i++)
		tvgpu_pt_set(ctx, va + (i << PAGE_SHIFT), 0);
	/* Cleared entries (possibly write-combined VRAM) land before the TLB flush. */
	wmb();
	tvgpu_ctx_wr(ctx->vgpu, ctx->id, TVGPU_CTX_TLB_INVALIDATE, 1);
	list_del(&found->node);
	tvgpu_bo_put(found->bo);
	kfree(found);
	err = 0;
unlock:
	mutex_unlock(&ctx->lock);
	return err;
}

static bool tvgpu_ctx_stopped(struct tvgpu_context *ctx)
{
	unsigned long flags;
	bool r;

	spin_lock_irqsave(&ctx->vgpu->irq_lock, flags);
	r = ctx->faulted;
	spin_unlock_irqrestore(&ctx->vgpu->irq_lock, flags);
	return r || READ_ONCE(ctx->vgpu->dead);
}

static u32 tvgpu_ring_space(struct tvgpu_context *ctx)
{
	u32 head = tvgpu_ctx_rd(ctx->vgpu, ctx->id, TVGPU_CTX_RING_HEAD);

	return ctx->ring_entries - (ctx->tail - head);
}

/*
 * Copies count packets into the ring, then a FENCE (with an interrupt) carrying the next
 * sequence number, and tells the device; returns that number in *seqno.
 */
int tvgpu_ctx_submit(struct tvgpu_context *ctx, const struct tvgpu_packet *pkts, u32 count,
		     u64 *seqno)
{
	struct tvgpu_device *vgpu = ctx->vgpu;
	struct tvgpu_packet fence = {
		.opcode = TVGPU_OP_FENCE,
		.flags = TVGPU_FENCE_IRQ,
	};
	u32 i, need = count + 1;
	int err = 0;

	if (!count || count >= ctx->ring_entries)
		return -EINVAL;
	mutex_lock(&ctx->lock);
	while (!err) {
		long r;

		if (tvgpu_ctx_stopped(ctx)) {
			err = READ_ONCE(vgpu->dead) ? -ENODEV : -EIO;
			break;
		}
		if (tvgpu_ring_space(ctx) >= need)
			break;
		r = wait_event_interruptible_timeout(ctx->wq, tvgpu_ctx_stopped(ctx) ||
						     tvgpu_ring_space(ctx) >= need,
						     TVGPU_POLL_SLICE);
		if (r < 0)
			err = -EINTR;
	}
	if (err)
		goto unlock;

	for (i = 0; i < count; i++)
		tvgpu_mem_write(ctx->ring, (u64)((ctx->tail + i) % ctx->ring_entries) *
				TVGPU_PACKET_SIZE, &pkts[i], sizeof(pkts[i]));
	fence.args[0] = TVGPU_FENCE_VA;
	fence.args[1] = ctx->seqno + 1;
	tvgpu_mem_write(ctx->ring, (u64)((ctx->tail + count) % ctx->ring_entries) *
			TVGPU_PACKET_SIZE, &fence, sizeof(fence));
	WRITE_ONCE(ctx->seqno, ctx->seqno + 1);
	ctx->tail += need;
	/* Packets (possibly write-combined VRAM) land before the device is told. */
	wmb();
	if (ctx->doorbell) {
		u32 tail = ctx->tail;

		u32 hint = 0;

		tvgpu_mem_write(ctx->fence, TVGPU_TAIL_SHADOW_OFF, &tail, sizeof(tail));
		if (ctx->suppress) {
			/*
			 * The tail is visible before the hint is read (a store-load barrier):
			 * the device clears the hint, fences and reads the tail once more
			 * before it stops watching, so one of the two sees the other.
			 */
			mb();
			tvgpu_mem_read(ctx->fence, TVGPU_TAIL_SHADOW_OFF + TVGPU_SHADOW_HINT,
				       &hint, sizeof(hint));
		}
		if (hint & TVGPU_SHADOW_POLLING) {
			ctx->doorbells_saved++;
		} else {
			/* The tail shadow lands before the doorbell makes the device read it. */
			wmb();
			tvgpu_wr(vgpu, TVGPU_DOORBELL(ctx->id), 1);
		}
	} else {
		tvgpu_ctx_wr(vgpu, ctx->id, TVGPU_CTX_RING_TAIL, ctx->tail);
	}
	*seqno = ctx->seqno;
unlock:
	mutex_unlock(&ctx->lock);
	return err;
}

/* Whether seqno is settled, with the result in *res. */
static bool tvgpu_ctx_settled(struct tvgpu_context *ctx, u64 seqno, int *res)
{
	unsigned long flags;
	bool done = true;
	unsigned int i;

	spin_lock_irqsave(&ctx->vgpu->irq_lock, flags);
	for (i = 0; i < ctx->ndropped; i++)
		if (seqno > ctx->dropped[i].from && seqno <= ctx->dropped[i].to) {
			*res = -ECANCELED;
			goto out;
		}
	if (seqno <= ctx->completed)
		*res = 0;
	else if (ctx->faulted)
		*res = -EIO;
	else if (READ_ONCE(ctx->vgpu->dead))
		*res = -ENODEV;
	else
		done = false;
out:
	spin_unlock_irqrestore(&ctx->vgpu->irq_lock, flags);
	return done;
}

/* Reads the context's fence and fault registers itself (in case an interrupt was lost). */
static void tvgpu_ctx_poll(struct tvgpu_context *ctx)
{
	unsigned long flags;

	if (READ_ONCE(ctx->vgpu->dead))
		return;
	spin_lock_irqsave(&ctx->vgpu->irq_lock, flags);
	tvgpu_ctx_update_fence(ctx);
	tvgpu_ctx_update_fault(ctx);
	spin_unlock_irqrestore(&ctx->vgpu->irq_lock, flags);
}

static unsigned int wait_spin_us = 50;
module_param(wait_spin_us, uint, 0644);
MODULE_PARM_DESC(wait_spin_us,
		 "Spin on the fence word this long (µs) before sleeping on the fence interrupt (0: never spin)");

/*
 * Spins up to wait_spin_us on the context's fence word (written by the device before its
 * fence interrupt: no exit to read it) until it reaches seqno; notes what it saw. A short job
 * then completes without the interrupt's wake-up; a long one costs this much CPU, then the
 * caller sleeps and leaves the CPU to others (on a small host, the GPU's own threads).
 */
static void tvgpu_ctx_spin(struct tvgpu_context *ctx, u64 seqno)
{
	u64 spin_ns = (u64)READ_ONCE(wait_spin_us) * NSEC_PER_USEC;
	u64 end = ktime_get_ns() + spin_ns;
	unsigned long flags;
	u64 f;

	if (!spin_ns)
		return;
	do {
		f = tvgpu_mem_rd64(ctx->fence, 0);
		if (f >= seqno)
			break;
		cpu_relax();
	} while (ktime_get_ns() < end && !need_resched());
	/* Reads of the results must not pass the read of the fence. */
	rmb();
	spin_lock_irqsave(&ctx->vgpu->irq_lock, flags);
	if (f > ctx->completed)
		ctx->completed = f;
	spin_unlock_irqrestore(&ctx->vgpu->irq_lock, flags);
}

/*
 * Waits until seqno completed: 0; -ETIME after timeout_ns (< 0: none); -EIO if the context
 * stopped on a fault first; -ECANCELED if a recovery dropped it (one of the last few); -EINTR on a signal
 * (interruptible only); -ENODEV if the device went away; -EINVAL if never submitted.
 */
int tvgpu_ctx_wait(struct tvgpu_context *ctx, u64 seqno, s64 timeout_ns, bool interruptible)
{
	unsigned long end = 0;
	bool forever = timeout_ns < 0;
	int res;

	if (seqno > READ_ONCE(ctx->seqno))
		return -EINVAL;
	if (!forever)
		end = jiffies + nsecs_to_jiffies(timeout_ns);
	if (timeout_ns && !tvgpu_ctx_settled(ctx, seqno, &res))
		tvgpu_ctx_spin(ctx, seqno);
	for (;;) {
		long slice = TVGPU_POLL_SLICE, r;

		if (tvgpu_ctx_settled(ctx, seqno, &res))
			return res;
		if (!forever) {
			if (time_after_eq(jiffies, end))
				break;
			slice = min_t(long, slice, end - jiffies);
		}
		if (interruptible) {
			r = wait_event_interruptible_timeout(ctx->wq,
							     tvgpu_ctx_settled(ctx, seqno, &res),
							     slice);
			if (r < 0)
				return -EINTR;
		} else {
			r = wait_event_timeout(ctx->wq, tvgpu_ctx_settled(ctx, seqno, &res), slice);
		}
		if (!r)
			tvgpu_ctx_poll(ctx);
	}
	tvgpu_ctx_poll(ctx);
	return tvgpu_ctx_settled(ctx, seqno, &res) ? res : -ETIME;
}

/*
 * Restarts a context stopped on a fault: reset, reprogram, enable. Work submitted but not
 * completed is dropped (its waits fail with -ECANCELED); mappings stay.
 */
int tvgpu_ctx_recover(struct tvgpu_context *ctx)
{
	struct tvgpu_device *vgpu = ctx->vgpu;
	u64 fence;

	mutex_lock(&ctx->lock);
	fence = tvgpu_ctx_program(ctx);
	spin_lock_irq(&vgpu->irq_lock);
	if (fence > ctx->completed)
		ctx->completed = fence;
	if (ctx->seqno > ctx->completed) {
		if (ctx->ndropped == TVGPU_DROPPED_RANGES) {
			memmove(&ctx->dropped[0], &ctx->dropped[1],
				sizeof(ctx->dropped[0]) * (TVGPU_DROPPED_RANGES - 1));
			ctx->ndropped--;
		}
		ctx->dropped[ctx->ndropped].from = ctx->completed;
		ctx->dropped[ctx->ndropped].to = ctx->seqno;
		ctx->ndropped++;
	}
	ctx->faulted = false;
	ctx->fault_code = 0;
	ctx->fault_addr = 0;
	spin_unlock_irq(&vgpu->irq_lock);
	wake_up(&ctx->wq);
	mutex_unlock(&ctx->lock);
	return 0;
}
