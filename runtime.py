"""Process setup shared by every entry point: the OpenMP wait policy, the allocator, the device, autocast.

Import it before torch in a script (`import runtime` first): the OpenMP policy must be in the
environment before torch loads its OpenMP runtime.

    python -c "import runtime; print(runtime.choose_device('auto'))"
"""
import os
import time


def others_busy(interval=0.1):
    """Cores' worth of CPU time that other processes used over `interval` seconds (this one sleeps meanwhile),
    from /proc/stat; None where it cannot be read (not Linux)."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(v), v[3] + v[4]
    try:
        total0, idle0 = snap()
        time.sleep(interval)
        total1, idle1 = snap()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return 0.0 if total <= 0 else (total - (idle1 - idle0)) / total * (os.cpu_count() or 1)


def openmp_wait_policy(environ, busy=others_busy, max_busy=0.5):
    """How OpenMP's threads wait between parallel regions, set in `environ` before torch loads its OpenMP
    runtime; returns what was decided, for the logs. An explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
    Otherwise busy() (cores used by other processes, or None where unknown) is looked at once: threads sleep
    (PASSIVE) from `max_busy` cores on or where it is unknown, since threads that spin while another job
    needs the cores slowed a training step up to 5x. On a CPU idle at start they keep OpenMP's default, a
    short spin before sleeping: sleeping after every parallel region made the demo width's step 1.3x slower
    in fp32 and 1.5x in bf16 on an idle 2-core CPU (docs/performance.md)."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return f"as set: OMP_WAIT_POLICY={environ.get('OMP_WAIT_POLICY', '')!r}, GOMP_SPINCOUNT={environ.get('GOMP_SPINCOUNT', '')!r}"
    load = busy()
    if load is None or load >= max_busy:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return "sleep (PASSIVE): " + ("the CPU's load is unknown" if load is None else
                                      f"other processes used {load:.1f} cores at start")
    return f"spin, then sleep (OpenMP's default): the CPU was idle at start ({load:.2f} cores used by others)"


OPENMP_WAIT = openmp_wait_policy(os.environ)

import torch  # noqa: E402


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the kernel.

    A training step frees and re-allocates the same few hundred MB of activations; by default glibc
    serves blocks above its mmap threshold with fresh mmaps and trims the heap after each free, so every
    step pays page faults to zero new pages again (about 9% of a CPU step here). Raising both
    thresholds (mallopt M_TRIM_THRESHOLD=-1, M_MMAP_THRESHOLD=-3) keeps the pages. Returns whether it
    applied: a no-op off glibc (macOS, Windows, musl).
    """
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-1, 2**31 - 1)) and bool(libc.mallopt(-3, 2**30))
    except (OSError, AttributeError):
        return False


def choose_device(device="auto", local_rank=0):
    """--device {auto, cpu, cuda} -> a torch.device: CUDA (this process's local rank) when asked for or,
    with auto, when present; the CPU otherwise. Raises ValueError when CUDA is asked for and absent."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def cpu_info():
    """(model name, feature flags) of the CPU from /proc/cpuinfo; platform.processor() and an empty set where
    there is none (e.g. macOS)."""
    import platform
    model, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return model, flags


def cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo (an empty set where there is none, e.g. macOS)."""
    return cpu_info()[1]


def resolve_amp(amp, device):
    """--amp auto -> "bf16" where the device computes bf16 natively (a CUDA GPU with bf16 support; a CPU
    with AVX-512-BF16 or AMX), "off" elsewhere: without those units PyTorch emulates bf16 convolutions,
    7-19x slower than fp32 (docs/performance.md). Other values are returned unchanged."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "off"
    return "bf16" if cpu_flags() & {"avx512_bf16", "amx_bf16"} else "off"


def autocast(device, amp):
    """Autocast context for --amp {off, bf16, fp16}."""
    if amp == "off":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
