/* kvmtrace: where the name /proc/PID/maps shows for a VMA is stored, so that
 * BPF can read it at the memslot ioctl (vma.h) and in the attach-time
 * iterator (iter_kvm.c) rather than rely on a smaps snapshot the VMM may not
 * live to see: a file's dentry name (memfd:NAME, [vfio-device] of an
 * anon_inode file, a path's last component); with no file, a special
 * mapping's own name ([vvar], [vdso], [sigpage] ...: fs/proc/task_mmu.c asks
 * vm_ops->name, which for special_mapping_vmops is special_mapping_name(),
 * returning vm_private_data's struct vm_special_mapping .name; a VMA without
 * a file whose vm_ops has no name has none stored). Included by absolute
 * path from the program text, so the compile cache hashes it. */

#ifdef KT_OFF_vm_special_mapping__name  /* the offsets are there (-D): used */
/* The kernel address of the VMA's name string, 0 if it has none. */
static __always_inline u64 kvmtrace_vma_name_ptr(u64 vma, u64 file)
{
    if (file) {
        u64 dentry = KVMTRACE_READ(u64, file, KT_OFF_file__f_path__dentry);
        return KVMTRACE_READ(u64, dentry, KT_OFF_dentry__d_name__name);
    }
    u64 ops = KVMTRACE_READ(u64, vma, KT_OFF_vm_area_struct__vm_ops);
    if (!KVMTRACE_READ(u64, ops, KT_OFF_vm_operations_struct__name))
        return 0;
    u64 special = KVMTRACE_READ(u64, vma, KT_OFF_vm_area_struct__vm_private_data);
    return KVMTRACE_READ(u64, special, KT_OFF_vm_special_mapping__name);
}
#endif
