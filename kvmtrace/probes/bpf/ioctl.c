/* kvmtrace: the KVM ioctls that define VMs, vCPUs and memslots.
 * sys_enter_ioctl keeps the request per thread; sys_exit_ioctl adds the result
 * and emits one event. The memslot struct is read from user memory at entry,
 * before KVM acts on it. */

struct kvmtrace_region {     /* struct kvm_userspace_memory_region2, first 48 bytes */
    u32 slot;
    u32 flags;
    u64 guest_phys_addr;
    u64 memory_size;
    u64 userspace_addr;
    u64 guest_memfd_offset;  /* REGION2 only */
    u32 guest_memfd;         /* REGION2 only */
    u32 pad1;
};

struct kvmtrace_pending {
    u64 ts;
    u64 arg;
    u32 cmd;
    s32 fd;
    u32 read_ok;
    u32 pad;
    struct kvmtrace_region r;
    struct kvmtrace_vma_ctx vma;  /* vma.h: the VMA at hva, looked up at entry */
    s32 vma_err;
    u32 vma_status;               /* KVMTRACE_VMA_* (events.VMA_STATUS) */
};

BPF_TABLE("lru_hash", u32, struct kvmtrace_pending, kvmtrace_pending_ioctl, 4096);
BPF_PERCPU_ARRAY(kvmtrace_scratch, struct kvmtrace_pending, 1);

/* An ioctl whose event will not be emitted is counted lost in its kind
 * (KVMTRACE_IDX_*: the event's index, -1 when not traced), so a recording
 * never drops one silently: the entry could not be kept, or an entry was
 * still there at the next entry (its sys_exit_ioctl was never seen). */
static __always_inline void kvmtrace_ioctl_lost(u32 cmd)
{
    int kind = (cmd == KVM_SET_USER_MEMORY_REGION || cmd == KVM_SET_USER_MEMORY_REGION2)
               ? KVMTRACE_IDX_MEMSLOT : KVMTRACE_IDX_VM_IOCTL;
    if (kind >= 0)
        kvmtrace_lost(kind);
}

static __always_inline int kvmtrace_ioctl_enter(u32 cmd, s32 fd, u64 arg, int lookup)
{
    if (cmd != KVM_RUN && cmd != KVM_SET_USER_MEMORY_REGION &&
        cmd != KVM_SET_USER_MEMORY_REGION2 && cmd != KVM_CREATE_VM &&
        cmd != KVM_CREATE_VCPU)
        return 0;
    if (!kvmtrace_wanted())
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    if (cmd == KVM_RUN) {
        kvmtrace_vcpu.update(&tid, &fd);
        return 0;
    }
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u8 vmm = 1;
    kvmtrace_vmms.update(&tgid, &vmm);  /* its exit will be recorded (proc.c) */
    int zero = 0;
    struct kvmtrace_pending *p = kvmtrace_scratch.lookup(&zero);
    if (!p)
        return 0;
    __builtin_memset(p, 0, sizeof(*p));
    p->ts = bpf_ktime_get_ns();
    p->cmd = cmd;
    p->fd = fd;
    p->arg = arg;
    if (cmd == KVM_SET_USER_MEMORY_REGION)
        p->read_ok = bpf_probe_read_user(&p->r, 32, (void *)arg) == 0;
    else if (cmd == KVM_SET_USER_MEMORY_REGION2)
        p->read_ok = bpf_probe_read_user(&p->r, sizeof(p->r), (void *)arg) == 0;
    if (p->read_ok && p->r.memory_size) {
        p->vma_status = KVMTRACE_VMA_UNAVAILABLE;
#ifdef KVMTRACE_VMA_LOOKUP
        if (lookup) {
            struct kvmtrace_vma_ctx c = {};  /* the callback's context must be on the stack */
            u64 hi = p->r.userspace_addr + p->r.memory_size;
            long err = kvmtrace_vma_lookup(&c, p->r.userspace_addr, hi);
            p->vma_err = err;
            p->vma_status = err == 0 ? KVMTRACE_VMA_FOUND :
                            err == -2 ? KVMTRACE_VMA_NONE : KVMTRACE_VMA_FAILED;
            __builtin_memcpy(&p->vma, &c, sizeof(c));
        }
#endif
    } else if (cmd == KVM_SET_USER_MEMORY_REGION || cmd == KVM_SET_USER_MEMORY_REGION2) {
        p->vma_status = KVMTRACE_VMA_SKIPPED;
    }
    struct kvmtrace_pending *stale = kvmtrace_pending_ioctl.lookup(&tid);
    if (stale)
        kvmtrace_ioctl_lost(stale->cmd);
    if (kvmtrace_pending_ioctl.update(&tid, p))
        kvmtrace_ioctl_lost(cmd);
    return 0;
}

/* Entry programs: kvmtrace loads and attaches one of them itself (program.py),
 * so they are not TRACEPOINT_PROBEs (bcc would load those at once, and bcc
 * cannot load a program with a callback). The one with the VMA lookup is
 * linked with its callback by kvmtrace.host.bccload; the other is the
 * fallback where the kernel refuses it. */
int kvmtrace_enter_ioctl(struct tracepoint__syscalls__sys_enter_ioctl *args)
{
    return kvmtrace_ioctl_enter(args->cmd, args->fd, args->arg, 1);
}

int kvmtrace_enter_ioctl_novma(void *ctx)
{
    /* bcc defines the args struct once, before the first function taking it */
    struct tracepoint__syscalls__sys_enter_ioctl *args = ctx;
    return kvmtrace_ioctl_enter(args->cmd, args->fd, args->arg, 0);
}

#ifdef KVMTRACE_VMA_LOOKUP
/* Registers the name "kvmtrace_vma_cb" with bcc; the asm label renames this
 * stub's own symbol, so the name resolves to the callback in vma.h. */
int kvmtrace_vma_cb(void *ctx) __asm__("kvmtrace_vma_cb_stub");
int kvmtrace_vma_cb(void *ctx)
{
    return 0;
}
#endif

TRACEPOINT_PROBE(syscalls, sys_exit_ioctl)
{
    /* Read ctx first: the verifier refuses ctx reads through a pointer the
     * compiler offset across the calls below. */
    s64 ret = args->ret;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct kvmtrace_pending *p = kvmtrace_pending_ioctl.lookup(&tid);
    if (!p)
        return 0;
    if (p->cmd == KVM_SET_USER_MEMORY_REGION || p->cmd == KVM_SET_USER_MEMORY_REGION2) {
        EMIT_MEMSLOT
    } else {
        EMIT_VM_IOCTL
    }
    kvmtrace_pending_ioctl.delete(&tid);
    return 0;
}
