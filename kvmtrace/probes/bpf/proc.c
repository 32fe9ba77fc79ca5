/* kvmtrace: the end of a VMM process, so a pid reused later in the same
 * recording starts a new process (and new VMs) instead of merging with the old.
 * Emitted once per VMM process (kvmtrace_vmms, filled at its first KVM ioctl or
 * by the collector for VMMs already running): when its whole thread group is
 * dead where the tracepoint says so (group_dead), else at the exit of its
 * leader thread (older kernels). */

TRACEPOINT_PROBE(sched, sched_process_exit)
{
#ifdef KVMTRACE_TP_GROUP_DEAD
    u8 dead = args->group_dead;
    if (!dead)
        return 0;
#else
    u8 dead = 2;
    u64 id = bpf_get_current_pid_tgid();
    if ((u32)id != (u32)(id >> 32))
        return 0;
#endif
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!kvmtrace_vmms.lookup(&tgid))
        return 0;
    kvmtrace_vmms.delete(&tgid);
EMIT_PROC_EXIT
    return 0;
}
