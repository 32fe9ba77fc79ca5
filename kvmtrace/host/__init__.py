"""Facts about the host kvmtrace runs on: tracefs, BTF, kernel headers for bcc,
KVM flavour, /proc readers, loading programs through bcc. Used by record (to
decide and to describe) and doctor.

Dependency direction: host is the bottom layer of the live side. It imports
nothing of kvmtrace but kvmtrace.kvmapi (KVM's ABI); the probes use host facts
(kvmtrace.probes imports kvmtrace.host), never the reverse, and host never
imports collectors, recording or analysis (tests/test_layering.py checks it).
"""
