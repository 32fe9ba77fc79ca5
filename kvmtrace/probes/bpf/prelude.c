/* kvmtrace: helpers shared by every probe. Structs and ring buffers come
 * before this text, generated from kvmtrace/probes/events.py. */

/* Processes to trace (tgid -> 1), filled from user space; only consulted
 * when KVMTRACE_FILTER_PIDS is defined. */
BPF_HASH(kvmtrace_pids, u32, u8, 4096);

/* VMM processes (tgid -> 1): set at their KVM ioctls, and by the collector
 * for VMMs running when recording starts; their exit is recorded (proc.c). */
BPF_HASH(kvmtrace_vmms, u32, u8, 16384);

/* Per-thread vCPU fd, set at each KVM_RUN entry: tracepoints on the fault path
 * carry no VM identity, the thread that runs the vCPU does. */
BPF_TABLE("lru_hash", u32, s32, kvmtrace_vcpu, 16384);

/* Events that found their ring buffer full, per event kind. */
BPF_PERCPU_ARRAY(kvmtrace_lost_count, u64, KVMTRACE_NKINDS);
/* The same totals in one array that the collector reads through mmap at each
 * flush, with no bpf() call: a map lookup from user space holds the CPU's
 * bpf_prog_active, and on a preemptible kernel every kprobe and tracepoint
 * program that runs on that CPU while the reader is preempted there is
 * skipped (collectors/progstats.py). */
BPF_F_TABLE("array", int, u64, kvmtrace_lost_total, KVMTRACE_NKINDS, BPF_F_MMAPABLE);

static __always_inline int kvmtrace_wanted(void)
{
#ifdef KVMTRACE_FILTER_PIDS
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    return kvmtrace_pids.lookup(&tgid) != NULL;
#else
    return 1;
#endif
}

/* Where events were lost: per process, event kind and 2 MiB guest-physical
 * region (gfn >> 9; KVMTRACE_NOWHERE for events with no guest address), so a
 * report can say which memslots lost events, not just how many were lost.
 * Bounded: when the LRU evicts, the per-kind totals above stay exact and the
 * report says how many lost events it could not place. */
#define KVMTRACE_NOWHERE (~0ULL)
struct kvmtrace_lost_key {
    u32 pid;
    u32 kind;
    u64 region;
};
struct kvmtrace_lost_val {
    u64 count;
    u64 first_ts;
    u64 last_ts;
};
BPF_TABLE("lru_hash", struct kvmtrace_lost_key, struct kvmtrace_lost_val,
          kvmtrace_lost_where, 16384);

static __always_inline void kvmtrace_lost_at(int kind, u64 gfn)
{
    u64 *n = kvmtrace_lost_count.lookup(&kind);
    if (n)
        (*n)++;
    u64 *t = kvmtrace_lost_total.lookup(&kind);
    if (t)
        __sync_fetch_and_add(t, 1);
    struct kvmtrace_lost_key k = {};
    k.pid = bpf_get_current_pid_tgid() >> 32;
    k.kind = kind;
    k.region = gfn == KVMTRACE_NOWHERE ? gfn : gfn >> 9;
    u64 now = bpf_ktime_get_ns();
    struct kvmtrace_lost_val *v = kvmtrace_lost_where.lookup(&k);
    if (v) {
        __sync_fetch_and_add(&v->count, 1);
        v->last_ts = now;
    } else {
        struct kvmtrace_lost_val init = {1, now, now};
        kvmtrace_lost_where.update(&k, &init);
    }
}

static __always_inline void kvmtrace_lost(int kind)
{
    kvmtrace_lost_at(kind, KVMTRACE_NOWHERE);
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
