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
};

BPF_TABLE("lru_hash", u32, struct kvmtrace_pending, kvmtrace_pending_ioctl, 4096);
BPF_PERCPU_ARRAY(kvmtrace_scratch, struct kvmtrace_pending, 1);

TRACEPOINT_PROBE(syscalls, sys_enter_ioctl)
{
    u32 cmd = args->cmd;
    s32 fd = args->fd;
    u64 arg = args->arg;
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
    kvmtrace_pending_ioctl.update(&tid, p);
    return 0;
}

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
