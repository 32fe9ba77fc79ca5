"""collectors: from BPF ring buffers to a recording file. ringbuf.py reads
batches without per-event Python, session.py runs a recording (attach, poll,
flush, snapshots, signals), context.py gathers what the recording must carry
to be read on another machine, live.py shows progress on stderr."""
