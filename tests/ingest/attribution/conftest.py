"""Attribution tests run single-threaded.

Their tensors are small (tens of thousands of elements), where intra-op threads cost
more in synchronization than they save, badly so on a shared, loaded machine.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
