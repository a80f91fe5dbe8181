"""Device resolution errors and the allocator setting the trainer applies."""

import subprocess
import sys

import pytest

from ingest.devices import resolve_device
from ingest.errors import InvalidArgumentError

pytestmark = pytest.mark.unit

# Twenty TopK training steps (d_model 64, width 512, batch 1024, two layers); prints the
# minor page faults they took.
_FAULTS = """
import resource, sys, torch
from ingest.devices import retain_freed_cpu_memory
from ingest.transcoders.trainable import Trainable
from ingest.transcoders.trainer import TrainConfig
if sys.argv[1] == "retain":
    assert retain_freed_cpu_memory()
torch.manual_seed(0)
trainable = Trainable(TrainConfig(width=512).module_config(64), 2, False)
optimizer = torch.optim.Adam(trainable.parameters(), lr=1e-3, fused=True)
x, y = torch.randn(2, 1024, 64), torch.randn(2, 1024, 64)
def step():
    optimizer.zero_grad(set_to_none=True)
    trainable.loss(x, y, None).mse.backward()
    optimizer.step()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_training_steps_reuse_freed_memory_instead_of_faulting_it_in_again():
    # One (width, batch) float32 matrix of the step is 512 x 1024 x 4 B = 512 pages, and a
    # step makes several. Faulted in afresh at every step, 20 steps take >= 10,240 faults;
    # retained, the pages are reused. Measured here: 2-1,100 faults retained; 13,000-27,000
    # with glibc's default, which now and then reuses them too (996 once, as its mmap
    # threshold adapts to frees from several threads), so the bound is on the retained
    # count alone.
    pages, steps = 512 * 1024 * 4 // 4096, 20
    assert _faults("retain") < steps * pages / 2


def test_unknown_device_names_the_choices():
    with pytest.raises(InvalidArgumentError, match="'cpu', 'cuda'"):
        resolve_device("tpu")
