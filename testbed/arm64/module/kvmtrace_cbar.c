// SPDX-License-Identifier: GPL-2.0
/*
 * kvmtrace_cbar: /dev/kvmtrace_cbar maps BAR 2 of the ivshmem-plain PCI
 * device (1af4:1110) with the VMA's default, *cacheable* page protection
 * (Normal memory): a cacheable VM_PFNMAP region that is not RAM, the case of
 * KVM's cacheable-PFNMAP rules (kvm_arch_prepare_memory_region refuses it
 * without S2FWB + CTR_EL0.DIC from 6.17; older kernels map it Device).
 * Test module for kvmtrace's arm64 testbed; not for production use.
 */
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/pci.h>

#define CBAR_VENDOR 0x1af4
#define CBAR_DEVICE 0x1110
#define CBAR_BAR 2

static struct pci_dev *cbar_pdev;

static int cbar_mmap(struct file *file, struct vm_area_struct *vma)
{
	resource_size_t start = pci_resource_start(cbar_pdev, CBAR_BAR);
	resource_size_t len = pci_resource_len(cbar_pdev, CBAR_BAR);
	unsigned long size = vma->vm_end - vma->vm_start;
	unsigned long off = vma->vm_pgoff << PAGE_SHIFT;

	if (off >= len || size > len - off)
		return -EINVAL;
	/* vma->vm_page_prot as the VMA got it: Normal cacheable, on purpose */
	return remap_pfn_range(vma, vma->vm_start, (start + off) >> PAGE_SHIFT, size,
			       vma->vm_page_prot);
}

static const struct file_operations cbar_fops = {
	.owner = THIS_MODULE,
	.mmap = cbar_mmap,
};

static struct miscdevice cbar_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "kvmtrace_cbar",
	.fops = &cbar_fops,
	.mode = 0600,
};

static int __init cbar_init(void)
{
	int ret;

	cbar_pdev = pci_get_device(CBAR_VENDOR, CBAR_DEVICE, NULL);
	if (!cbar_pdev) {
		pr_err("kvmtrace_cbar: no ivshmem-plain PCI device (%04x:%04x)\n",
		       CBAR_VENDOR, CBAR_DEVICE);
		return -ENODEV;
	}
	if (!(pci_resource_flags(cbar_pdev, CBAR_BAR) & IORESOURCE_MEM) ||
	    !pci_resource_len(cbar_pdev, CBAR_BAR)) {
		pr_err("kvmtrace_cbar: %s BAR %d is not a memory BAR\n",
		       pci_name(cbar_pdev), CBAR_BAR);
		ret = -ENODEV;
		goto put;
	}
	ret = pci_enable_device(cbar_pdev);
	if (ret)
		goto put;
	ret = misc_register(&cbar_misc);
	if (ret)
		goto disable;
	pr_info("kvmtrace_cbar: /dev/kvmtrace_cbar maps %s BAR %d %pR cacheable\n",
		pci_name(cbar_pdev), CBAR_BAR, &cbar_pdev->resource[CBAR_BAR]);
	return 0;
disable:
	pci_disable_device(cbar_pdev);
put:
	pci_dev_put(cbar_pdev);
	return ret;
}

static void __exit cbar_exit(void)
{
	misc_deregister(&cbar_misc);
	pci_disable_device(cbar_pdev);
	pci_dev_put(cbar_pdev);
}

module_init(cbar_init);
module_exit(cbar_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kvmtrace test: ivshmem BAR 2 mapped cacheable (VM_PFNMAP, not RAM)");
