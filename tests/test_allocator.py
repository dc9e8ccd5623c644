"""lightning_merge.allocator: compute stages keep freed memory, streamed merges return it at once."""

import subprocess
import sys

CHECK = """
import ctypes, resource, sys, torch
from lightning_merge.allocator import keep_freed_memory, return_freed_memory
print((return_freed_memory if sys.argv[1:] == ["return"] else keep_freed_memory)())
keep = [torch.ones(1 << 20) for _ in range(8)]  # a busy heap, as between a stage's steps
torch.zeros(3 << 20); before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    torch.zeros(3 << 20)  # 12 MB, freed at once: re-used, or mapped and faulted in again
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run(env_value=None, *args):
    env = {"PATH": "/usr/bin:/bin"} | ({"LIGHTNING_MERGE_MALLOC": env_value} if env_value else {})
    out = subprocess.run([sys.executable, "-c", CHECK, *args], capture_output=True, text=True, check=True, env=env)
    kept, faults = out.stdout.split()
    return kept == "True", int(faults)


def test_freed_blocks_are_reused_by_compute_stages_and_returned_by_streamed_merges():
    """50 allocations of 12 MB, each freed at once: a streamed merge maps and faults every one of them
    in afresh (50 × 3,072 pages); a compute stage re-uses the freed block (a few first-touch faults,
    how many depends on the heap's history, never one set per allocation)."""
    kept, faults_kept = run()
    returned, faults_returned = run(None, "return")
    assert kept and returned
    assert faults_returned >= 50 * 3072 * 0.9
    assert faults_kept < faults_returned / 4
    untouched, _ = run("system")  # glibc's own adaptive thresholds
    assert not untouched
