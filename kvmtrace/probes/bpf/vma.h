/* kvmtrace: the VMA behind a memslot, looked up in BPF at the memslot ioctl
 * itself (bpf_find_vma, Linux 5.17+), so it is known even when the VMM exits
 * or remaps before user space could read /proc/PID/smaps.
 *
 * Included by absolute path from the program text (program.py), before
 * ioctl.c. Kernel struct members are read at offsets from the running
 * kernel's BTF (-DKT_OFF_<struct>__<member>, kvmtrace.host.btf); the struct
 * below is always compiled (it is part of the per-thread ioctl state), the
 * lookup only with KVMTRACE_VMA_LOOKUP.
 *
 * Why this file is a header: bpf_find_vma takes a callback, i.e. a BPF
 * subprogram. bcc 0.26 rewrites the parameters of every non-static function of
 * the main source as probe arguments (param 2 becomes ctx->si, ...) and
 * leaves a static one in .text, which it neither exposes nor relocates. A
 * function defined in a header is left alone; its asm label makes its symbol
 * "kvmtrace_vma_cb", the name ioctl.c registers with bcc through a stub whose
 * own symbol is renamed, so BPF.dump_func("kvmtrace_vma_cb") returns the
 * callback's instructions. kvmtrace.host.bccload then appends them to the
 * entry program, turns the unrelocated ld_imm64 of the callback's address
 * into a BPF_PSEUDO_FUNC and loads both with BTF func_info (the verifier
 * requires it for callbacks). */

struct kvmtrace_vma_ctx {
    u64 start;      /* first VMA: vm_start */
    u64 end;        /* vm_end */
    u64 flags;      /* vm_flags */
    u64 prot;       /* vm_page_prot */
    u64 pgoff;      /* vm_pgoff */
    u64 ino;        /* vm_file->f_inode->i_ino */
    u64 next;       /* vm_end of the last VMA the walk saw */
    u32 dev;        /* vm_file->f_inode->i_sb->s_dev */
    u32 count;      /* VMAs seen */
    u32 has_file;   /* vm_file != NULL */
    u32 magic;      /* vm_file->f_inode->i_sb->s_magic */
    char name[64];  /* its name as stored (vma_name.h), NUL-terminated (events.VMA_NAME_LEN) */
};

#ifdef KVMTRACE_VMA_LOOKUP

/* Helper numbers are uAPI (enum bpf_func_id): declared here so the program
 * compiles with any bcc, whatever its helpers.h knows; a kernel without them
 * refuses the program at load, and kvmtrace then loads the variant without
 * the lookup. */
static long (*kvmtrace_find_vma)(void *task, u64 addr, void *callback_fn,
                                 void *callback_ctx, u64 flags) = (void *)180;
static void *(*kvmtrace_current_task_btf)(void) = (void *)158;

long kvmtrace_vma_cb_impl(void *task, void *vma, void *data) __asm__("kvmtrace_vma_cb");
long kvmtrace_vma_cb_impl(void *task, void *vma, void *data)
{
    struct kvmtrace_vma_ctx *c = data;
    u64 end = KVMTRACE_READ(u64, vma, KT_OFF_vm_area_struct__vm_end);
    if (c->count == 0) {
        c->start = KVMTRACE_READ(u64, vma, KT_OFF_vm_area_struct__vm_start);
        c->end = end;
        c->flags = KVMTRACE_READ(u64, vma, KT_OFF_vm_area_struct__vm_flags);
        c->prot = KVMTRACE_READ(u64, vma, KT_OFF_vm_area_struct__vm_page_prot);
        c->pgoff = KVMTRACE_READ(u64, vma, KT_OFF_vm_area_struct__vm_pgoff);
        u64 file = KVMTRACE_READ(u64, vma, KT_OFF_vm_area_struct__vm_file);
        if (file) {
            u64 inode = KVMTRACE_READ(u64, file, KT_OFF_file__f_inode);
            u64 sb = KVMTRACE_READ(u64, inode, KT_OFF_inode__i_sb);
            c->has_file = 1;
            c->ino = KVMTRACE_READ(u64, inode, KT_OFF_inode__i_ino);
            c->dev = KVMTRACE_READ(u32, sb, KT_OFF_super_block__s_dev);
            c->magic = (u32)KVMTRACE_READ(u64, sb, KT_OFF_super_block__s_magic);
        }
        /* vma_name.h; a name at 0 fails and leaves it empty */
        u64 name = kvmtrace_vma_name_ptr((u64)vma, file);
        bpf_probe_read_kernel_str(c->name, sizeof(c->name), (void *)name);
    }
    c->next = end;
    c->count++;
    return 0;
}

/* The VMA containing [lo, ...) and how many adjacent VMAs cover [lo, hi):
 * a slot spanning several VMAs is legal. The first lookup's result is the
 * status; the walk stops at a hole or after KVMTRACE_VMA_WALK VMAs. */
#define KVMTRACE_VMA_WALK 8
static __always_inline long kvmtrace_vma_lookup(struct kvmtrace_vma_ctx *c, u64 lo, u64 hi)
{
    void *task = kvmtrace_current_task_btf();
    long err = kvmtrace_find_vma(task, lo, kvmtrace_vma_cb_impl, c, 0);
    if (err)
        return err;
#pragma unroll
    for (int i = 1; i < KVMTRACE_VMA_WALK; i++) {
        if (c->next >= hi)
            break;
        if (kvmtrace_find_vma(task, c->next, kvmtrace_vma_cb_impl, c, 0))
            break;
    }
    return 0;
}

#endif /* KVMTRACE_VMA_LOOKUP */
