"""Facts about the host kvmtrace runs on: tracefs, kernel headers for bcc, KVM
flavour, /proc readers. Used by record (to decide and to describe) and doctor."""
