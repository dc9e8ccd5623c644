"""lightning_merge.allocator: the command keeps freed memory; the package alone changes nothing."""

import subprocess
import sys

CHECK = """
import ctypes, resource, torch
from lightning_merge.allocator import keep_freed_memory
print(keep_freed_memory())
keep = [torch.ones(1 << 20) for _ in range(8)]  # a busy heap, as between a stage's steps
torch.zeros(3 << 20); before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.zeros(3 << 20)  # 12 MB, freed at once: re-used, or mapped and faulted in again
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run(env_value=None):
    env = {"PATH": "/usr/bin:/bin"} | ({"LIGHTNING_MERGE_MALLOC": env_value} if env_value else {})
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, env=env)
    kept, faults = out.stdout.split()
    return kept == "True", int(faults)


def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    kept, faults = run()
    assert kept and faults < 20 * 3072 / 4  # 20 × 3,072 pages of 4 KiB when every block comes back fresh
    untouched, _ = run("system")  # glibc's own adaptive thresholds: how many faults depends on its history
    assert not untouched
