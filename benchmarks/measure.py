"""What the benchmark scripts measure in their child processes."""

from pathlib import Path


def peak_rss() -> int:
    """This process's peak resident memory, in bytes. Not getrusage's ru_maxrss: Linux carries that over from the
    parent through fork and exec, so a child would report the benchmark's own peak if it was higher."""
    status = Path("/proc/self/status").read_text()
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(kib) * 1024
