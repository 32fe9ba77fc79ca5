/* kvmtrace query: the memslots and VMAs of a VM that is already running,
 * read by BPF iterator programs (BPF_TRACE_ITER; no kprobe, no fentry).
 *
 * kvmtrace_iter_memslots runs on iter/task_file: for each open file of the
 * target process (tgid in kvmtrace_iter_tgid) whose dentry is "kvm-vm" (the
 * anon inode every KVM_CREATE_VM fd points at; /proc/PID/fd shows
 * "anon_inode:kvm-vm"), file->private_data is the struct kvm. For each
 * address space, kvm->memslots[as_id] is the active struct kvm_memslots;
 * its id_hash buckets (hlist through slot->id_node[slots->node_idx], Linux
 * 5.17+) hold every slot. One record per slot, framed by a header and a
 * trailer that carry the memslots generation before and after the walk: the
 * walk runs without kvm->srcu, so user space retries when a memslot update
 * raced with it (generation changed, or bit 63 "update in progress" set).
 *
 * kvmtrace_iter_vmas runs on iter/task_vma: one record per VMA of the target
 * process (vm_start, vm_end, vm_flags, vm_page_prot, vm_pgoff, the file's
 * inode and device).
 *
 * Every struct member is read at an offset from the running kernel's BTF
 * (-DKT_OFF_<struct>__<member>, kvmtrace.collectors.snapshot); the record
 * structs come before this text, generated from the field lists there, then
 * KVMTRACE_READ (probes/codegen.py) and vma_name.h.
 * Records go out through bpf_seq_write (helper 127, Linux 5.9+) and are read
 * from the iterator's fd. bcc compiles this; kvmtrace loads it as
 * BPF_PROG_TYPE_TRACING / BPF_TRACE_ITER itself (bcc 0.26 cannot attach
 * iterators). */


static long (*kvmtrace_seq_write)(void *m, const void *data, u32 len) = (void *)127;

/* The process to look at (tgid): set by user space before each read. Also
 * passed to the kernel's own task filter where it has one (Linux 6.1+). */
BPF_ARRAY(kvmtrace_iter_tgid, u32, 1);

/* Where the memslot walk is (see kvmtrace_iter_memslots). */
struct kvmtrace_walk {
    u64 slots;      /* struct kvm_memslots * of the address space walked */
    u64 node;       /* hlist node next to visit, 0: take the next bucket */
    u64 node_off;   /* offsetof(struct kvm_memory_slot, id_node[slots->node_idx]) */
    u64 bucket;     /* next id_hash bucket */
    u32 as_id;
    u32 emitted;    /* slots seen in this address space */
    u32 written;    /* slot records written for this VM */
    u32 pad;
    struct kvmtrace_slot_rec rec;  /* the record being written */
};
BPF_PERCPU_ARRAY(kvmtrace_iter_walk, struct kvmtrace_walk, 1);

/* The ctx of iter/task_file and iter/task_vma: pointers at BTF offsets. */
struct kvmtrace_iter_ctx {
    u64 words[4];
};
#define KT_CTX(ctx, off) (*(u64 *)((char *)(ctx) + (off)))

static __always_inline int kvmtrace_iter_wanted(u64 task)
{
    int zero = 0;
    u32 *want = kvmtrace_iter_tgid.lookup(&zero);
    if (!want || !task)
        return 0;
    return KVMTRACE_READ(u32, task, KT_OFF_task_struct__tgid) == *want;
}

/* "kvm-vm\0" as a little-endian u64 of its first 7 bytes. */
#define KT_KVM_VM_NAME 0x006d762d6d766bULL

int kvmtrace_iter_memslots(struct kvmtrace_iter_ctx *ctx)
{
    u64 meta = KT_CTX(ctx, KT_OFF_bpf_iter__task_file__meta);
    u64 task = KT_CTX(ctx, KT_OFF_bpf_iter__task_file__task);
    u64 file = KT_CTX(ctx, KT_OFF_bpf_iter__task_file__file);
    u32 fd = *(u32 *)((char *)ctx + KT_OFF_bpf_iter__task_file__fd);
    if (!file || !kvmtrace_iter_wanted(task))
        return 0;
    void *seq = *(void **)meta;  /* meta->seq: a direct load, the helper wants the BTF pointer */

    u64 dentry = KVMTRACE_READ(u64, file, KT_OFF_file__f_path__dentry);
    u64 name = KVMTRACE_READ(u64, dentry, KT_OFF_dentry__d_name__name);
    u64 head = KVMTRACE_READ(u64, name, 0);
    if ((head & 0x00ffffffffffffffULL) != KT_KVM_VM_NAME)
        return 0;
    u64 kvm = KVMTRACE_READ(u64, file, KT_OFF_file__private_data);
    if (!kvm)
        return 0;


    /* The walk's position lives in a per-CPU map value, not in registers:
     * a counter the verifier knows exactly is marked precise at every
     * comparison, and then no two iterations' states are alike and the
     * verifier follows every combination of (bucket, slots seen) (measured:
     * over its 1,000,000 instruction limit). Loaded from map memory, they are
     * unknown scalars and the states at the loop head prune: 562,606
     * instructions processed with the record on the stack, 189,653 with it
     * in the map value too (6.18, one address space, 333 slots at most).
     * Iterator programs do not migrate between CPUs while they run. */
    int zero = 0;
    struct kvmtrace_walk *w = kvmtrace_iter_walk.lookup(&zero);
    if (!w)
        return 0;
    /* the record is built in the map value too: nothing the verifier tracks */
    struct kvmtrace_slot_rec *r = &w->rec;
    __builtin_memset(r, 0, sizeof(*r));
    r->fd = fd;
    r->kvm = kvm;
    r->tgid = KVMTRACE_READ(u32, task, KT_OFF_task_struct__tgid);
    w->as_id = 0;
    w->bucket = 0;
    w->emitted = 0;
    w->written = 0;
    w->node = 0;
    w->slots = KVMTRACE_READ(u64, kvm, KT_OFF_kvm__memslots);
    w->node_off = KVMTRACE_READ(s32, w->slots, KT_OFF_kvm_memslots__node_idx) ? KT_SIZE_hlist_node : 0;
    r->kind = KT_REC_HEADER;
    r->as_id = 0;
    r->generation = KVMTRACE_READ(u64, w->slots, KT_OFF_kvm_memslots__generation);
    r->status = w->slots ? 0 : 1;
    kvmtrace_seq_write(seq, r, sizeof(*r));

    for (int i = 0; i < KT_MAX_STEPS; i++) {
        u64 node = w->node;
        if (node) {
            u64 s = node - w->node_off;  /* container_of(node, struct kvm_memory_slot, id_node[idx]) */
            if (w->written < KT_MAX_SLOTS) {  /* what fits in the iterator's buffer */
                w->written++;
                r->kind = KT_REC_SLOT;
                r->as_id = w->as_id;
                r->slot = (u32)(s32)KVMTRACE_READ(s16, s, KT_OFF_kvm_memory_slot__id);
                r->slot_as_id = KVMTRACE_READ(u16, s, KT_OFF_kvm_memory_slot__as_id);
                r->flags = KVMTRACE_READ(u32, s, KT_OFF_kvm_memory_slot__flags);
                r->base_gfn = KVMTRACE_READ(u64, s, KT_OFF_kvm_memory_slot__base_gfn);
                r->npages = KVMTRACE_READ(u64, s, KT_OFF_kvm_memory_slot__npages);
                r->hva = KVMTRACE_READ(u64, s, KT_OFF_kvm_memory_slot__userspace_addr);
#if KT_OFF_kvm_memory_slot__gmem__file >= 0
                r->gmem_file = KVMTRACE_READ(u64, s, KT_OFF_kvm_memory_slot__gmem__file);
                r->gmem_pgoff = KVMTRACE_READ(u64, s, KT_OFF_kvm_memory_slot__gmem__pgoff);
#endif
                kvmtrace_seq_write(seq, r, sizeof(*r));
            }
            w->emitted++;
            w->node = KVMTRACE_READ(u64, node, KT_OFF_hlist_node__next);
            continue;
        }
        u64 bucket = w->bucket;
        if (bucket < KT_ID_HASH_BUCKETS) {
            w->node = KVMTRACE_READ(u64, w->slots, KT_OFF_kvm_memslots__id_hash + bucket * 8);
            w->bucket = bucket + 1;
            continue;
        }
        /* this address space is done: its trailer, then the next one */
        r->kind = KT_REC_TRAILER;
        r->as_id = w->as_id;
        r->generation = KVMTRACE_READ(u64, w->slots, KT_OFF_kvm_memslots__generation);
        r->count = w->emitted;
        r->status = 0;
        kvmtrace_seq_write(seq, r, sizeof(*r));
        u32 next = w->as_id + 1;
        if (next >= KT_NR_ADDRESS_SPACES)
            return 0;
        w->as_id = next;
        w->bucket = 0;
        w->emitted = 0;
        w->slots = KVMTRACE_READ(u64, kvm, KT_OFF_kvm__memslots + (u64)next * 8);
        w->node_off = KVMTRACE_READ(s32, w->slots, KT_OFF_kvm_memslots__node_idx) ? KT_SIZE_hlist_node : 0;
        r->kind = KT_REC_HEADER;
        r->as_id = next;
        r->generation = KVMTRACE_READ(u64, w->slots, KT_OFF_kvm_memslots__generation);
        r->status = w->slots ? 0 : 1;
        r->count = 0;
        kvmtrace_seq_write(seq, r, sizeof(*r));
    }
    /* out of steps before the walk ended: say so (user space reports it) */
    r->kind = KT_REC_TRAILER;
    r->as_id = w->as_id;
    r->generation = KVMTRACE_READ(u64, w->slots, KT_OFF_kvm_memslots__generation);
    r->count = w->emitted;
    r->status = 2;
    kvmtrace_seq_write(seq, r, sizeof(*r));
    return 0;
}

int kvmtrace_iter_vmas(struct kvmtrace_iter_ctx *ctx)
{
    u64 meta = KT_CTX(ctx, KT_OFF_bpf_iter__task_vma__meta);
    u64 task = KT_CTX(ctx, KT_OFF_bpf_iter__task_vma__task);
    u64 vma = KT_CTX(ctx, KT_OFF_bpf_iter__task_vma__vma);
    if (!vma || !kvmtrace_iter_wanted(task))
        return 0;
    void *seq = *(void **)meta;
    struct kvmtrace_vma_rec r = {};
    r.start = KVMTRACE_READ(u64, vma, KT_OFF_vm_area_struct__vm_start);
    r.end = KVMTRACE_READ(u64, vma, KT_OFF_vm_area_struct__vm_end);
    r.vm_flags = KVMTRACE_READ(u64, vma, KT_OFF_vm_area_struct__vm_flags);
    r.vm_page_prot = KVMTRACE_READ(u64, vma, KT_OFF_vm_area_struct__vm_page_prot);
    r.vm_pgoff = KVMTRACE_READ(u64, vma, KT_OFF_vm_area_struct__vm_pgoff);
    u64 file = KVMTRACE_READ(u64, vma, KT_OFF_vm_area_struct__vm_file);
    if (file) {
        u64 inode = KVMTRACE_READ(u64, file, KT_OFF_file__f_inode);
        u64 sb = KVMTRACE_READ(u64, inode, KT_OFF_inode__i_sb);
        r.has_file = 1;
        r.ino = KVMTRACE_READ(u64, inode, KT_OFF_inode__i_ino);
        r.dev = KVMTRACE_READ(u32, sb, KT_OFF_super_block__s_dev);
        r.magic = (u32)KVMTRACE_READ(u64, sb, KT_OFF_super_block__s_magic);
    }
    u64 name = kvmtrace_vma_name_ptr(vma, file);  /* vma_name.h */
    bpf_probe_read_kernel_str(r.name, sizeof(r.name), (void *)name);
    r.tgid = KVMTRACE_READ(u32, task, KT_OFF_task_struct__tgid);
    kvmtrace_seq_write(seq, &r, sizeof(r));
    return 0;
}
