"""CPU training keeps freed memory for reuse instead of faulting it back in on every step."""
import platform
import subprocess
import sys

import pytest

# Training steps of a small conv net in a fresh process (glibc's settings are process-wide);
# prints the page faults of ten steps, after three warm-up steps that first touch the memory.
STEPS = """
import resource, sys, torch
from torch import nn
from cvrecipe.device import backend_settings
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.GELU(),
                    nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.GELU(),
                    nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 16 * 16, 10))
x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))  # activations ~8 MB each

def step():
    nn.functional.cross_entropy(net(x), y).backward()

def faults():
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

if sys.argv[1] == "cpu-training":
    with backend_settings(torch.device("cpu")):
        print(faults())
else:
    print(faults())
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


@pytest.mark.slow
@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_cpu_training_steps_reuse_freed_memory_instead_of_faulting_it_in():
    plain, training = _faults("plain"), _faults("cpu-training")
    # glibc's defaults hand the freed activations back to the kernel: thousands of faults a step
    assert plain > 10 * 2000, plain
    # kept for reuse: a few thousand at most (one more heap growth now and then), not thousands a step
    assert training * 4 < plain, (training, plain)
