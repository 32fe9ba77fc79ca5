/* kvmtrace: helpers shared by every probe. Structs and ring buffers come
 * before this text, generated from kvmtrace/probes/events.py. */

/* Processes to trace (tgid -> 1), filled from user space; only consulted
 * when KVMTRACE_FILTER_PIDS is defined. */
BPF_HASH(kvmtrace_pids, u32, u8, 4096);

/* Per-thread vCPU fd, set at each KVM_RUN entry: tracepoints on the fault path
 * carry no VM identity, the thread that runs the vCPU does. */
BPF_TABLE("lru_hash", u32, s32, kvmtrace_vcpu, 16384);

/* Events that found their ring buffer full, per event kind. */
BPF_PERCPU_ARRAY(kvmtrace_lost_count, u64, KVMTRACE_NKINDS);

static __always_inline int kvmtrace_wanted(void)
{
#ifdef KVMTRACE_FILTER_PIDS
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    return kvmtrace_pids.lookup(&tgid) != NULL;
#else
    return 1;
#endif
}

static __always_inline void kvmtrace_lost(int kind)
{
    u64 *n = kvmtrace_lost_count.lookup(&kind);
    if (n)
        (*n)++;
}

static __always_inline s32 kvmtrace_current_vcpu(u32 tid)
{
    s32 *fd = kvmtrace_vcpu.lookup(&tid);
    return fd ? *fd : -1;
}

#define KVMTRACE_HEADER(e) do {                                   \
        u64 __id = bpf_get_current_pid_tgid();                    \
        (e)->ts = bpf_ktime_get_ns();                             \
        (e)->pid = __id >> 32;                                    \
        (e)->tid = (u32)__id;                                     \
        (e)->vcpu_fd = kvmtrace_current_vcpu((u32)__id);          \
        (e)->cpu = bpf_get_smp_processor_id();                    \
    } while (0)

#ifdef KVMTRACE_FILTER_PIDS
/* Follow the traced processes' children (a VMM launched by a wrapper). */
TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    if (!kvmtrace_pids.lookup(&parent))
        return 0;
    u32 child = args->child_pid;
    u8 one = 1;
    kvmtrace_pids.update(&child, &one);
    return 0;
}
#endif
