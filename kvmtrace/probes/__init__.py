"""probes: the BPF side. Event declarations (events.py), the code generated from
them (codegen.py), the catalogue of probe points and what each host can attach
(catalogue.py), the assembled bcc program (program.py), and the one path that
selects, builds and loads it for record and doctor (load.py).

Dependency direction: probes use host facts (kvmtrace.host: tracefs, BTF,
kernel headers, bcc loading); host never imports probes. Probes import nothing
from collectors, recording or analysis (tests/test_layering.py checks it)."""
