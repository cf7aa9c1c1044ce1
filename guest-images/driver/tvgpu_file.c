// SPDX-License-Identifier: GPL-2.0-only OR MIT
/*
 * tessera_vgpu: the character device. One open file = one GPU context (created on first use)
 * plus the buffer objects it created. See tessera_vgpu_ioctl.h for the interface.
 */
#include <linux/err.h>
#include <linux/fs.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/version.h>

#include "tvgpu.h"

static bool ctx_in_vram = true;
module_param(ctx_in_vram, bool, 0644);
MODULE_PARM_DESC(ctx_in_vram,
		 "Put the page tables, ring and fence page of new contexts in VRAM (default) or in system memory");

/* mmap offsets: handle << TVGPU_MMAP_SHIFT, so a buffer object may be up to 4 GiB. */
#define TVGPU_MMAP_SHIFT	32
#define TVGPU_MAX_HANDLE	(1 << 19)

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
#define tvgpu_vma_set_flags(vma, f)	vm_flags_set(vma, f)
#else
#define tvgpu_vma_set_flags(vma, f)	((vma)->vm_flags |= (f))
#endif

/* The file's context, created on first use. */
static struct tvgpu_context *tvgpu_file_ctx(struct tvgpu_file *f)
{
	struct tvgpu_context *ctx;

	mutex_lock(&f->lock);
	if (!f->ctx) {
		ctx = tvgpu_ctx_create(f->vgpu, ctx_in_vram ? TVGPU_LOC_VRAM : TVGPU_LOC_SYS, 0, true);
		if (!IS_ERR(ctx))
			f->ctx = ctx;
	} else {
		ctx = f->ctx;
	}
	mutex_unlock(&f->lock);
	return ctx;
}

static struct tvgpu_bo *tvgpu_file_bo(struct tvgpu_file *f, u32 handle)
{
	struct tvgpu_bo *bo;

	mutex_lock(&f->lock);
	bo = idr_find(&f->bos, handle);
	if (bo)
		tvgpu_bo_get(bo);
	mutex_unlock(&f->lock);
	return bo;
}

static int tvgpu_open(struct inode *inode, struct file *filp)
{
	struct tvgpu_device *vgpu = tvgpu_lookup_minor(iminor(inode));
	struct tvgpu_file *f;

	if (!vgpu)
		return -ENODEV;
	f = kzalloc(sizeof(*f), GFP_KERNEL);
	if (!f) {
		tvgpu_put(vgpu);
		return -ENOMEM;
	}
	f->vgpu = vgpu;
	f->filp = filp;
	mutex_init(&f->lock);
	idr_init_base(&f->bos, 1);
	mutex_lock(&vgpu->files_lock);
	list_add_tail(&f->node, &vgpu->files);
	mutex_unlock(&vgpu->files_lock);
	filp->private_data = f;
	return 0;
}

static int tvgpu_release(struct inode *inode, struct file *filp)
{
	struct tvgpu_file *f = filp->private_data;
	struct tvgpu_device *vgpu = f->vgpu;
	struct tvgpu_bo *bo;
	int handle;

	mutex_lock(&vgpu->files_lock);
	list_del(&f->node);
	mutex_unlock(&vgpu->files_lock);

	down_read(&vgpu->remove_sem);
	if (f->ctx)
		tvgpu_ctx_destroy(f->ctx);
	up_read(&vgpu->remove_sem);
	idr_for_each_entry(&f->bos, bo, handle)
		tvgpu_bo_put(bo);
	idr_destroy(&f->bos);
	kfree(f);
	tvgpu_put(vgpu);
	return 0;
}

/* CPU mappings of every open file lose their pages (the device is going away). */
void tvgpu_zap_mappings(struct tvgpu_device *vgpu)
{
	struct tvgpu_file *f;

	mutex_lock(&vgpu->files_lock);
	list_for_each_entry(f, &vgpu->files, node)
		unmap_mapping_range(f->filp->f_mapping, 0, 0, 1);
	mutex_unlock(&vgpu->files_lock);
}

static int tvgpu_ioctl_info(struct tvgpu_file *f, void __user *arg)
{
	struct tvgpu_device *vgpu = f->vgpu;
	struct pci_dev *pdev = vgpu->pdev;
	struct tvgpu_info info = {
		.ioctl_version = TVGPU_IOCTL_VERSION,
		.abi_version = vgpu->version,
		.caps = vgpu->caps,
		.num_contexts = vgpu->num_ctx,
		.kernels = vgpu->kernels,
		.vram_size = vgpu->vram_size,
		.ring_entries = min_t(u32, TVGPU_RING_ENTRIES, vgpu->max_ring),
		.msix_vectors = vgpu->nvec,
		.ctx_id = TVGPU_NO_CONTEXT,
		.pci_domain = pci_domain_nr(pdev->bus),
		.pci_bus = pdev->bus->number,
		.pci_devfn = pdev->devfn,
		.subsystem_id = pdev->subsystem_device,
		.va_start = TVGPU_VA_USER_START,
		.va_end = TVGPU_VA_USER_END,
	};

	mutex_lock(&vgpu->vram_lock);
	info.vram_free = (u64)vgpu->vram_free << PAGE_SHIFT;
	mutex_unlock(&vgpu->vram_lock);
	spin_lock_irq(&vgpu->irq_lock);
	info.contexts_in_use = hweight_long(vgpu->ctx_used);
	spin_unlock_irq(&vgpu->irq_lock);
	info.fault_count = tvgpu_rd(vgpu, TVGPU_REG_FAULT_COUNT);
	mutex_lock(&f->lock);
	if (f->ctx)
		info.ctx_id = f->ctx->id;
	mutex_unlock(&f->lock);
	return copy_to_user(arg, &info, sizeof(info)) ? -EFAULT : 0;
}

static int tvgpu_ioctl_bo_create(struct tvgpu_file *f, void __user *arg)
{
	struct tvgpu_bo_create req;
	struct tvgpu_bo *bo;
	int handle;

	if (copy_from_user(&req, arg, sizeof(req)))
		return -EFAULT;
	if (req.flags & ~TVGPU_BO_SYSMEM || !req.size)
		return -EINVAL;
	bo = tvgpu_bo_create(f->vgpu, req.flags & TVGPU_BO_SYSMEM ? TVGPU_LOC_SYS : TVGPU_LOC_VRAM,
			     req.size);
	if (IS_ERR(bo))
		return PTR_ERR(bo);
	mutex_lock(&f->lock);
	handle = idr_alloc(&f->bos, bo, 1, TVGPU_MAX_HANDLE, GFP_KERNEL);
	mutex_unlock(&f->lock);
	if (handle < 0) {
		tvgpu_bo_put(bo);
		return handle;
	}
	bo->handle = handle;
	req.handle = handle;
	req.size = bo->mem->size;
	req.mmap_offset = (u64)handle << TVGPU_MMAP_SHIFT;
	if (copy_to_user(arg, &req, sizeof(req))) {
		mutex_lock(&f->lock);
		idr_remove(&f->bos, handle);
		mutex_unlock(&f->lock);
		tvgpu_bo_put(bo);
		return -EFAULT;
	}
	return 0;
}

static int tvgpu_ioctl_bo_destroy(struct tvgpu_file *f, void __user *arg)
{
	struct tvgpu_bo_destroy req;
	struct tvgpu_bo *bo;

	if (copy_from_user(&req, arg, sizeof(req)))
		return -EFAULT;
	mutex_lock(&f->lock);
	bo = idr_remove(&f->bos, req.handle);
	mutex_unlock(&f->lock);
	if (!bo)
		return -ENOENT;
	tvgpu_bo_put(bo);
	return 0;
}

static int tvgpu_ioctl_map(struct tvgpu_file *f, void __user *arg)
{
	struct tvgpu_context *ctx;
	struct tvgpu_map req;
	struct tvgpu_bo *bo;
	int err;

	if (copy_from_user(&req, arg, sizeof(req)))
		return -EFAULT;
	if (req.flags & ~TVGPU_MAP_READONLY)
		return -EINVAL;
	ctx = tvgpu_file_ctx(f);
	if (IS_ERR(ctx))
		return PTR_ERR(ctx);
	bo = tvgpu_file_bo(f, req.handle);
	if (!bo)
		return -ENOENT;
	err = tvgpu_ctx_map(ctx, bo, req.bo_offset, req.size, &req.va,
			    !(req.flags & TVGPU_MAP_READONLY));
	tvgpu_bo_put(bo);
	if (err)
		return err;
	if (copy_to_user(arg, &req, sizeof(req))) {
		tvgpu_ctx_unmap(ctx, req.va);
		return -EFAULT;
	}
	return 0;
}

static int tvgpu_ioctl_unmap(struct tvgpu_file *f, void __user *arg)
{
	struct tvgpu_context *ctx;
	struct tvgpu_unmap req;

	if (copy_from_user(&req, arg, sizeof(req)))
		return -EFAULT;
	ctx = tvgpu_file_ctx(f);
	if (IS_ERR(ctx))
		return PTR_ERR(ctx);
	return tvgpu_ctx_unmap(ctx, req.va);
}

static int tvgpu_ioctl_submit(struct tvgpu_file *f, void __user *arg)
{
	struct tvgpu_packet *pkts;
	struct tvgpu_context *ctx;
	struct tvgpu_submit req;
	u32 i;
	int err;

	if (copy_from_user(&req, arg, sizeof(req)))
		return -EFAULT;
	if (req.flags)
		return -EINVAL;
	ctx = tvgpu_file_ctx(f);
	if (IS_ERR(ctx))
		return PTR_ERR(ctx);
	if (!req.count || req.count >= ctx->ring_entries)
		return -EINVAL;
	pkts = memdup_user(u64_to_user_ptr(req.packets), (size_t)req.count * sizeof(*pkts));
	if (IS_ERR(pkts))
		return PTR_ERR(pkts);
	err = 0;
	for (i = 0; i < req.count; i++)
		if (pkts[i].opcode == TVGPU_OP_FENCE)
			err = -EINVAL;
	if (!err)
		err = tvgpu_ctx_submit(ctx, pkts, req.count, &req.seqno);
	kfree(pkts);
	if (err)
		return err;
	return copy_to_user(arg, &req, sizeof(req)) ? -EFAULT : 0;
}

static int tvgpu_ioctl_wait(struct tvgpu_file *f, void __user *arg)
{
	struct tvgpu_context *ctx;
	struct tvgpu_wait req;

	if (copy_from_user(&req, arg, sizeof(req)))
		return -EFAULT;
	ctx = tvgpu_file_ctx(f);
	if (IS_ERR(ctx))
		return PTR_ERR(ctx);
	return tvgpu_ctx_wait(ctx, req.seqno, req.timeout_ns, true);
}

static int tvgpu_ioctl_ctx_state(struct tvgpu_file *f, void __user *arg)
{
	struct tvgpu_context *ctx;
	struct tvgpu_ctx_state st = { 0 };

	ctx = tvgpu_file_ctx(f);
	if (IS_ERR(ctx))
		return PTR_ERR(ctx);
	st.ctx_id = ctx->id;
	st.submitted = READ_ONCE(ctx->seqno);
	spin_lock_irq(&f->vgpu->irq_lock);
	st.flags = ctx->faulted ? TVGPU_STATE_FAULTED : 0;
	st.fault_code = ctx->fault_code;
	st.fault_addr = ctx->fault_addr;
	st.faults = ctx->faults;
	st.completed = ctx->completed;
	spin_unlock_irq(&f->vgpu->irq_lock);
	return copy_to_user(arg, &st, sizeof(st)) ? -EFAULT : 0;
}

static long tvgpu_ioctl(struct file *filp, unsigned int cmd, unsigned long arg)
{
	struct tvgpu_file *f = filp->private_data;
	struct tvgpu_device *vgpu = f->vgpu;
	void __user *uarg = (void __user *)arg;
	struct tvgpu_context *ctx;
	long ret;

	down_read(&vgpu->remove_sem);
	if (READ_ONCE(vgpu->dead)) {
		up_read(&vgpu->remove_sem);
		return -ENODEV;
	}
	switch (cmd) {
	case TVGPU_IOCTL_INFO:
		ret = tvgpu_ioctl_info(f, uarg);
		break;
	case TVGPU_IOCTL_BO_CREATE:
		ret = tvgpu_ioctl_bo_create(f, uarg);
		break;
	case TVGPU_IOCTL_BO_DESTROY:
		ret = tvgpu_ioctl_bo_destroy(f, uarg);
		break;
	case TVGPU_IOCTL_MAP:
		ret = tvgpu_ioctl_map(f, uarg);
		break;
	case TVGPU_IOCTL_UNMAP:
		ret = tvgpu_ioctl_unmap(f, uarg);
		break;
	case TVGPU_IOCTL_SUBMIT:
		ret = tvgpu_ioctl_submit(f, uarg);
		break;
	case TVGPU_IOCTL_WAIT:
		ret = tvgpu_ioctl_wait(f, uarg);
		break;
	case TVGPU_IOCTL_CTX_STATE:
		ret = tvgpu_ioctl_ctx_state(f, uarg);
		break;
	case TVGPU_IOCTL_RECOVER:
		ctx = tvgpu_file_ctx(f);
		ret = IS_ERR(ctx) ? PTR_ERR(ctx) : tvgpu_ctx_recover(ctx);
		break;
	default:
		ret = -ENOTTY;
	}
	up_read(&vgpu->remove_sem);
	return ret;
}

static void tvgpu_vm_open(struct vm_area_struct *vma)
{
	tvgpu_bo_get(vma->vm_private_data);
}

static void tvgpu_vm_close(struct vm_area_struct *vma)
{
	tvgpu_bo_put(vma->vm_private_data);
}

/* No fault handler: pages are mapped at mmap() time; after removal an access gets SIGBUS. */
static const struct vm_operations_struct tvgpu_vm_ops = {
	.open = tvgpu_vm_open,
	.close = tvgpu_vm_close,
};

static int tvgpu_mmap_bo(struct tvgpu_device *vgpu, struct tvgpu_bo *bo,
			 struct vm_area_struct *vma, unsigned long first)
{
	unsigned long len = vma->vm_end - vma->vm_start, i;
	struct tvgpu_mem *mem = bo->mem;
	int err;

	if (mem->loc == TVGPU_LOC_VRAM) {
		/* Through the aperture: CPU access to VRAM never leaves the guest. */
		tvgpu_vma_set_flags(vma, VM_IO | VM_PFNMAP | VM_DONTEXPAND | VM_DONTDUMP);
		vma->vm_page_prot = pgprot_writecombine(vma->vm_page_prot);
		return io_remap_pfn_range(vma, vma->vm_start,
					  ((vgpu->vram_phys + mem->vram_off) >> PAGE_SHIFT) + first,
					  len, vma->vm_page_prot);
	}
	tvgpu_vma_set_flags(vma, VM_DONTEXPAND | VM_DONTDUMP);
	for (i = 0; i < len >> PAGE_SHIFT; i++) {
		err = vm_insert_page(vma, vma->vm_start + (i << PAGE_SHIFT),
				     virt_to_page(mem->vaddr[first + i]));
		if (err)
			return err;
	}
	return 0;
}

static int tvgpu_mmap(struct file *filp, struct vm_area_struct *vma)
{
	struct tvgpu_file *f = filp->private_data;
	struct tvgpu_device *vgpu = f->vgpu;
	unsigned long shift = TVGPU_MMAP_SHIFT - PAGE_SHIFT;
	unsigned long handle = vma->vm_pgoff >> shift;
	unsigned long first = vma->vm_pgoff & ((1UL << shift) - 1);
	unsigned long pages = (vma->vm_end - vma->vm_start) >> PAGE_SHIFT;
	struct tvgpu_bo *bo;
	int err;

	if (!(vma->vm_flags & VM_SHARED) || handle >= TVGPU_MAX_HANDLE)
		return -EINVAL;
	down_read(&vgpu->remove_sem);
	err = -ENODEV;
	if (READ_ONCE(vgpu->dead))
		goto unlock;
	err = -ENOENT;
	bo = tvgpu_file_bo(f, handle);
	if (!bo)
		goto unlock;
	err = -EINVAL;
	if (first >= bo->mem->npages || pages > bo->mem->npages - first) {
		tvgpu_bo_put(bo);
		goto unlock;
	}
	err = tvgpu_mmap_bo(vgpu, bo, vma, first);
	if (err) {
		tvgpu_bo_put(bo);
		goto unlock;
	}
	/* The mapping holds the buffer object until it goes away. */
	vma->vm_private_data = bo;
	vma->vm_ops = &tvgpu_vm_ops;
unlock:
	up_read(&vgpu->remove_sem);
	return err;
}

const struct file_operations tvgpu_fops = {
	.owner = THIS_MODULE,
	.open = tvgpu_open,
	.release = tvgpu_release,
	.unlocked_ioctl = tvgpu_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.mmap = tvgpu_mmap,
	.llseek = noop_llseek,
};
