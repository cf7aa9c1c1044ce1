// SPDX-License-Identifier: GPL-2.0-only OR MIT
/*
 * tessera_vgpu: Linux driver for the Tessera vGPU (PCI 7e55:0001, class 3D controller).
 *
 * Probe: enable the function, map BAR0 (registers) and BAR2 (the VRAM aperture,
 * write-combined), check the magic and the ABI major version, reset the device, allocate
 * MSI-X vectors (entry 0: faults; entries 1..: context fences), optionally run the self-test,
 * and create /dev/tessera/vgpu<N>. Remove undoes all of it and resets the device; files still
 * open keep their memory until they are closed, but lose the hardware (-ENODEV) and their CPU
 * mappings.
 */
#include <linux/dma-mapping.h>
#include <linux/delay.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/module.h>
#include <linux/slab.h>
#include <linux/version.h>

#include "tvgpu.h"

static bool selftest;
module_param(selftest, bool, 0444);
MODULE_PARM_DESC(selftest, "Run the in-kernel self-test when a vGPU is probed (default: no)");

static struct class *tvgpu_class;
static dev_t tvgpu_devt_base;
static DEFINE_IDR(tvgpu_minors);
static DEFINE_MUTEX(tvgpu_minors_lock);

static const char *const tvgpu_fault_names[] = {
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

const char *tvgpu_fault_name(u32 code)
{
	if (code < ARRAY_SIZE(tvgpu_fault_names) && tvgpu_fault_names[code])
		return tvgpu_fault_names[code];
	return "unknown";
}

void tvgpu_get(struct tvgpu_device *vgpu)
{
	kref_get(&vgpu->ref);
}

static void tvgpu_release(struct kref *ref)
{
	struct tvgpu_device *vgpu = container_of(ref, struct tvgpu_device, ref);

	tvgpu_vram_fini(vgpu);
	pci_dev_put(vgpu->pdev);
	kfree(vgpu);
}

void tvgpu_put(struct tvgpu_device *vgpu)
{
	kref_put(&vgpu->ref, tvgpu_release);
}

/* The vGPU with char-device minor `minor`, with a reference, or NULL. */
struct tvgpu_device *tvgpu_lookup_minor(int minor)
{
	struct tvgpu_device *vgpu;

	mutex_lock(&tvgpu_minors_lock);
	vgpu = idr_find(&tvgpu_minors, minor);
	if (vgpu)
		tvgpu_get(vgpu);
	mutex_unlock(&tvgpu_minors_lock);
	return vgpu;
}

/* MSI-X entry of context ctx's fence interrupts. */
unsigned int tvgpu_ctx_vector(struct tvgpu_device *vgpu, u32 ctx)
{
	if (vgpu->nvec <= 1)
		return 0;
	return 1 + ctx % (vgpu->nvec - 1);
}

static irqreturn_t tvgpu_irq(int irq, void *data)
{
	struct tvgpu_vector *v = data;
	struct tvgpu_device *vgpu = v->vgpu;
	u32 status, fences;

	atomic_inc(&v->count);
	/*
	 * Every vector looks at everything pending (vectors may be shared when the device
	 * has more contexts than we got vectors). Acknowledge first: an event that comes
	 * after the read raises its bit and its message again.
	 */
	status = tvgpu_rd(vgpu, TVGPU_REG_INT_STATUS);
	if (!status)
		return IRQ_HANDLED;
	tvgpu_wr(vgpu, TVGPU_REG_INT_STATUS, status);

	spin_lock(&vgpu->irq_lock);
	if (status & TVGPU_INT_FAULT)
		tvgpu_irq_faults(vgpu);
	fences = status >> TVGPU_INT_FENCE_SHIFT;
	while (fences) {
		u32 id = __ffs(fences);

		fences &= fences - 1;
		tvgpu_irq_fence(vgpu, id);
	}
	spin_unlock(&vgpu->irq_lock);
	return IRQ_HANDLED;
}

/*
 * Function-level reset: every context stops and is cleared, VRAM is scrubbed, interrupt and
 * fault registers and the MSI-X table return to power-on state. Linux's MSI-X messages are
 * written back afterwards. No context may be in use (the caller's business).
 */
int tvgpu_hw_reset(struct tvgpu_device *vgpu)
{
	int i;

	tvgpu_wr(vgpu, TVGPU_REG_RESET, TVGPU_RESET_VALUE);
	for (i = 0; !(tvgpu_rd(vgpu, TVGPU_REG_STATUS) & TVGPU_STATUS_READY); i++) {
		if (i == 100) {
			dev_err(tvgpu_dev(vgpu), "device not ready after reset\n");
			return -ETIMEDOUT;
		}
		usleep_range(1000, 2000);
	}
	if (vgpu->nvec)
		pci_restore_msi_state(vgpu->pdev);
	tvgpu_wr(vgpu, TVGPU_REG_FAULT_VECTOR, 0);
	tvgpu_wr(vgpu, TVGPU_REG_INT_STATUS, ~0U);
	tvgpu_wr(vgpu, TVGPU_REG_INT_MASK, 0);
	return 0;
}

static void tvgpu_free_irqs(struct tvgpu_device *vgpu)
{
	unsigned int i;

	if (!vgpu->nvec)
		return;
	tvgpu_wr(vgpu, TVGPU_REG_INT_MASK, ~0U);
	for (i = 0; i < vgpu->nvec; i++)
		free_irq(pci_irq_vector(vgpu->pdev, i), &vgpu->vec[i]);
	pci_free_irq_vectors(vgpu->pdev);
	vgpu->nvec = 0;
}

static int tvgpu_setup_irqs(struct tvgpu_device *vgpu)
{
	struct pci_dev *pdev = vgpu->pdev;
	unsigned int want = min_t(unsigned int, TVGPU_NVEC_MAX, 1 + vgpu->num_ctx);
	unsigned int i;
	int n, err;

	n = pci_alloc_irq_vectors(pdev, 1, want, PCI_IRQ_MSIX);
	if (n < 0) {
		dev_err(&pdev->dev, "cannot allocate MSI-X vectors: %d\n", n);
		return n;
	}
	for (i = 0; i < n; i++) {
		struct tvgpu_vector *v = &vgpu->vec[i];

		v->vgpu = vgpu;
		v->index = i;
		atomic_set(&v->count, 0);
		if (i == 0)
			snprintf(v->name, sizeof(v->name), "tvgpu%d-fault", vgpu->minor);
		else
			snprintf(v->name, sizeof(v->name), "tvgpu%d-ctx%u", vgpu->minor, i - 1);
		err = request_irq(pci_irq_vector(pdev, i), tvgpu_irq, 0, v->name, v);
		if (err) {
			dev_err(&pdev->dev, "cannot request MSI-X vector %u: %d\n", i, err);
			while (i--)
				free_irq(pci_irq_vector(pdev, i), &vgpu->vec[i]);
			pci_free_irq_vectors(pdev);
			return err;
		}
	}
	vgpu->nvec = n;
	tvgpu_wr(vgpu, TVGPU_REG_FAULT_VECTOR, 0);
	tvgpu_wr(vgpu, TVGPU_REG_INT_STATUS, ~0U);
	tvgpu_wr(vgpu, TVGPU_REG_INT_MASK, 0);
	return 0;
}

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 2, 0)
static char *tvgpu_devnode(const struct device *dev, umode_t *mode)
#else
static char *tvgpu_devnode(struct device *dev, umode_t *mode)
#endif
{
	if (mode)
		*mode = 0666;
	return kasprintf(GFP_KERNEL, "tessera/%s", dev_name(dev));
}

static int tvgpu_chardev_add(struct tvgpu_device *vgpu)
{
	int err;

	vgpu->devt = MKDEV(MAJOR(tvgpu_devt_base), vgpu->minor);
	vgpu->cdev = cdev_alloc();
	if (!vgpu->cdev)
		return -ENOMEM;
	vgpu->cdev->owner = THIS_MODULE;
	vgpu->cdev->ops = &tvgpu_fops;
	err = cdev_add(vgpu->cdev, vgpu->devt, 1);
	if (err) {
		kobject_put(&vgpu->cdev->kobj);
		vgpu->cdev = NULL;
		return err;
	}
	vgpu->chardev = device_create(tvgpu_class, tvgpu_dev(vgpu), vgpu->devt, vgpu, "vgpu%d",
				      vgpu->minor);
	if (IS_ERR(vgpu->chardev)) {
		err = PTR_ERR(vgpu->chardev);
		vgpu->chardev = NULL;
		cdev_del(vgpu->cdev);
		vgpu->cdev = NULL;
		return err;
	}
	return 0;
}

static void tvgpu_chardev_del(struct tvgpu_device *vgpu)
{
	if (vgpu->chardev)
		device_destroy(tvgpu_class, vgpu->devt);
	vgpu->chardev = NULL;
	if (vgpu->cdev)
		cdev_del(vgpu->cdev);
	vgpu->cdev = NULL;
}

static void tvgpu_unmap_bars(struct tvgpu_device *vgpu)
{
	struct pci_dev *pdev = vgpu->pdev;

	if (vgpu->vram)
		iounmap(vgpu->vram);
	vgpu->vram = NULL;
	if (vgpu->regs)
		pci_iounmap(pdev, vgpu->regs);
	vgpu->regs = NULL;
	pci_release_regions(pdev);
	pci_disable_device(pdev);
}

static int tvgpu_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct tvgpu_device *vgpu;
	resource_size_t bar2_len;
	u32 magic, major;
	int err;

	vgpu = kzalloc(sizeof(*vgpu), GFP_KERNEL);
	if (!vgpu)
		return -ENOMEM;
	kref_init(&vgpu->ref);
	vgpu->pdev = pci_dev_get(pdev);
	spin_lock_init(&vgpu->irq_lock);
	INIT_LIST_HEAD(&vgpu->zombies);
	init_rwsem(&vgpu->remove_sem);
	mutex_init(&vgpu->files_lock);
	INIT_LIST_HEAD(&vgpu->files);

	mutex_lock(&tvgpu_minors_lock);
	vgpu->minor = idr_alloc(&tvgpu_minors, NULL, 0, TVGPU_MAX_DEVICES, GFP_KERNEL);
	mutex_unlock(&tvgpu_minors_lock);
	if (vgpu->minor < 0) {
		err = vgpu->minor;
		goto put;
	}

	err = pci_enable_device(pdev);
	if (err)
		goto free_minor;
	err = pci_request_regions(pdev, TVGPU_DRV_NAME);
	if (err) {
		pci_disable_device(pdev);
		goto free_minor;
	}
	err = -ENODEV;
	if (!(pci_resource_flags(pdev, TVGPU_PCI_BAR_REGS) & IORESOURCE_MEM) ||
	    pci_resource_len(pdev, TVGPU_PCI_BAR_REGS) < TVGPU_PCI_BAR_REGS_SIZE ||
	    !(pci_resource_flags(pdev, TVGPU_PCI_BAR_VRAM) & IORESOURCE_MEM)) {
		dev_err(&pdev->dev, "unexpected BAR layout\n");
		goto unmap;
	}
	vgpu->regs = pci_iomap(pdev, TVGPU_PCI_BAR_REGS, TVGPU_PCI_BAR_REGS_SIZE);
	if (!vgpu->regs)
		goto unmap;

	magic = tvgpu_rd(vgpu, TVGPU_REG_MAGIC);
	vgpu->version = tvgpu_rd(vgpu, TVGPU_REG_VERSION);
	major = vgpu->version >> 16;
	if (magic != TVGPU_MAGIC_VALUE || major != TVGPU_VERSION_MAJOR) {
		dev_err(&pdev->dev, "not a Tessera vGPU of ABI %llu.x (magic %#x, version %#x)\n",
			TVGPU_VERSION_MAJOR, magic, vgpu->version);
		goto unmap;
	}

	err = dma_set_mask_and_coherent(&pdev->dev, DMA_BIT_MASK(52));
	if (err)
		goto unmap;
	pci_set_master(pdev);

	/* A known state whatever the previous driver (or a crashed kernel) left behind. */
	err = tvgpu_hw_reset(vgpu);
	if (err)
		goto unmap;
	vgpu->caps = tvgpu_rd(vgpu, TVGPU_REG_CAPS);
	vgpu->kernels = tvgpu_rd(vgpu, TVGPU_REG_KERNELS);
	vgpu->num_ctx = min_t(u32, tvgpu_rd(vgpu, TVGPU_REG_NUM_CONTEXTS), TVGPU_MAX_CONTEXTS);
	vgpu->max_ring = min_t(u32, tvgpu_rd(vgpu, TVGPU_REG_MAX_RING_ENTRIES),
			       TVGPU_MAX_RING_ENTRIES);
	/*
	 * The device's DMA domain is the guest's RAM: it takes guest-physical addresses. Behind
	 * a (virtual) IOMMU the DMA API would hand out other addresses, so system memory is off.
	 */
	vgpu->sysmem_ok = (vgpu->caps & TVGPU_CAP_SYSMEM) && !device_iommu_mapped(&pdev->dev);
	if ((vgpu->caps & TVGPU_CAP_SYSMEM) && !vgpu->sysmem_ok)
		dev_warn(&pdev->dev, "behind an IOMMU: system-memory buffers are disabled\n");
	bar2_len = pci_resource_len(pdev, TVGPU_PCI_BAR_VRAM);
	vgpu->vram_phys = pci_resource_start(pdev, TVGPU_PCI_BAR_VRAM);
	vgpu->vram_size = min_t(u64, tvgpu_rd64(vgpu, TVGPU_REG_VRAM_SIZE_LO), bar2_len);
	vgpu->vram_size &= PAGE_MASK;
	if (!vgpu->num_ctx || vgpu->max_ring < 2 || vgpu->vram_size < 16 * PAGE_SIZE) {
		dev_err(&pdev->dev, "unusable device: %u contexts, rings of %u, %llu bytes of VRAM\n",
			vgpu->num_ctx, vgpu->max_ring, vgpu->vram_size);
		err = -ENODEV;
		goto unmap;
	}
	err = -ENOMEM;
	vgpu->vram = ioremap_wc(vgpu->vram_phys, vgpu->vram_size);
	if (!vgpu->vram)
		goto unmap;
	err = tvgpu_vram_init(vgpu);
	if (err)
		goto unmap;

	err = tvgpu_setup_irqs(vgpu);
	if (err)
		goto unmap;
	pci_set_drvdata(pdev, vgpu);

	dev_info(&pdev->dev,
		 "Tessera vGPU %u.%u: %llu MiB VRAM at %pa, %u contexts, caps %#x, MSI-X %u vectors\n",
		 major, vgpu->version & 0xffff, vgpu->vram_size >> 20, &vgpu->vram_phys,
		 vgpu->num_ctx, vgpu->caps, vgpu->nvec);

	if (selftest)
		tvgpu_selftest(vgpu);

	err = tvgpu_chardev_add(vgpu);
	if (err) {
		dev_err(&pdev->dev, "cannot create the character device: %d\n", err);
		goto irqs;
	}
	mutex_lock(&tvgpu_minors_lock);
	idr_replace(&tvgpu_minors, vgpu, vgpu->minor);
	mutex_unlock(&tvgpu_minors_lock);
	dev_info(&pdev->dev, "%s/vgpu%d ready\n", TVGPU_DEV_DIR, vgpu->minor);
	return 0;

irqs:
	pci_set_drvdata(pdev, NULL);
	tvgpu_free_irqs(vgpu);
	tvgpu_hw_reset(vgpu);
	tvgpu_free_zombies(vgpu);
unmap:
	pci_clear_master(pdev);
	tvgpu_unmap_bars(vgpu);
free_minor:
	mutex_lock(&tvgpu_minors_lock);
	idr_remove(&tvgpu_minors, vgpu->minor);
	mutex_unlock(&tvgpu_minors_lock);
put:
	tvgpu_put(vgpu);
	return err;
}

static void tvgpu_remove(struct pci_dev *pdev)
{
	struct tvgpu_device *vgpu = pci_get_drvdata(pdev);

	/* No new opens. */
	mutex_lock(&tvgpu_minors_lock);
	idr_remove(&tvgpu_minors, vgpu->minor);
	mutex_unlock(&tvgpu_minors_lock);
	tvgpu_chardev_del(vgpu);

	/* Open files lose the hardware: wake their waiters, wait for ioctls in flight. */
	WRITE_ONCE(vgpu->dead, true);
	tvgpu_wake_all(vgpu);
	down_write(&vgpu->remove_sem);
	up_write(&vgpu->remove_sem);
	tvgpu_zap_mappings(vgpu);

	tvgpu_free_irqs(vgpu);
	tvgpu_hw_reset(vgpu);
	/* The device is stopped: memory of contexts closed while busy can go back. */
	tvgpu_free_zombies(vgpu);
	pci_clear_master(pdev);
	tvgpu_unmap_bars(vgpu);
	pci_set_drvdata(pdev, NULL);
	dev_info(&pdev->dev, "removed\n");
	tvgpu_put(vgpu);
}

static const struct pci_device_id tvgpu_ids[] = {
	{ PCI_DEVICE(TVGPU_PCI_VENDOR_ID, TVGPU_PCI_DEVICE_ID) },
	{ }
};
MODULE_DEVICE_TABLE(pci, tvgpu_ids);

static struct pci_driver tvgpu_pci_driver = {
	.name = TVGPU_DRV_NAME,
	.id_table = tvgpu_ids,
	.probe = tvgpu_probe,
	.remove = tvgpu_remove,
};

static int __init tvgpu_init(void)
{
	int err;

	err = alloc_chrdev_region(&tvgpu_devt_base, 0, TVGPU_MAX_DEVICES, TVGPU_DRV_NAME);
	if (err)
		return err;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 4, 0)
	tvgpu_class = class_create("tessera");
#else
	tvgpu_class = class_create(THIS_MODULE, "tessera");
#endif
	if (IS_ERR(tvgpu_class)) {
		err = PTR_ERR(tvgpu_class);
		goto unregister;
	}
	tvgpu_class->devnode = tvgpu_devnode;
	err = pci_register_driver(&tvgpu_pci_driver);
	if (err)
		goto destroy;
	return 0;
destroy:
	class_destroy(tvgpu_class);
unregister:
	unregister_chrdev_region(tvgpu_devt_base, TVGPU_MAX_DEVICES);
	return err;
}

static void __exit tvgpu_exit(void)
{
	pci_unregister_driver(&tvgpu_pci_driver);
	class_destroy(tvgpu_class);
	unregister_chrdev_region(tvgpu_devt_base, TVGPU_MAX_DEVICES);
	idr_destroy(&tvgpu_minors);
}

module_init(tvgpu_init);
module_exit(tvgpu_exit);

MODULE_DESCRIPTION("Tessera vGPU driver");
MODULE_AUTHOR("The Tessera developers");
MODULE_LICENSE("Dual MIT/GPL");
