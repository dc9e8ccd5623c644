"""lightning_merge.allocator: compute stages keep freed memory, streamed merges return it at once."""

import subprocess
import sys

CHECK = """
import ctypes, resource, sys, torch
from lightning_merge.allocator import keep_freed_memory, return_freed_memory
print((return_freed_memory if sys.argv[1:] == ["return"] else keep_freed_memory)())
keep = [torch.ones(1 << 20) for _ in range(8)]  # a busy heap, as between a stage's steps
torch.zeros(3 << 20); before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.zeros(3 << 20)  # 12 MB, freed at once: re-used, or mapped and faulted in again
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run(env_value=None, *args):
    env = {"PATH": "/usr/bin:/bin"} | ({"LIGHTNING_MERGE_MALLOC": env_value} if env_value else {})
    out = subprocess.run([sys.executable, "-c", CHECK, *args], capture_output=True, text=True, check=True, env=env)
    kept, faults = out.stdout.split()
    return kept == "True", int(faults)


def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    kept, faults = run()
    assert kept and faults < 20 * 3072 / 4  # 20 × 3,072 pages of 4 KiB when every block comes back fresh
    untouched, _ = run("system")  # glibc's own adaptive thresholds: how many faults depends on its history
    assert not untouched


def test_a_streamed_merge_returns_every_large_block_at_once():
    returned, faults = run(None, "return")
    assert returned and faults >= 20 * 3072 * 0.9  # each 12 MB block mapped afresh: its pages fault in again
