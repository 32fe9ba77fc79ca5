"""kvmtrace.guest: the built-in guest (a small pure-Python KVM VMM).

It runs guest code that touches chosen pages of memslots with chosen
backings and writes a JSON report of exactly what it did, so the tracer's
output can be checked against it. See __main__.py for the command line and
vmm.run() for use from Python.
"""
