"""probes: the BPF side. Event declarations (events.py), the code generated from
them (codegen.py), the catalogue of probe points and what each host can attach
(catalogue.py), and the assembled bcc program (program.py)."""
