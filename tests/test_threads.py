"""one_thread: one torch thread inside the block, the caller's count restored after it, even on an error."""

import pytest
import torch

from unitscope.dictionaries.threads import one_thread


def test_one_thread_inside_and_restored_after_an_error():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), one_thread():
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
