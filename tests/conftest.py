import numpy as np
import pytest

import optcore


@pytest.fixture(autouse=True)
def _restore_threads():
    """Each test starts from the runtime's default thread count and flush-to-zero off."""
    yield
    optcore.set_num_threads(None)
    optcore.set_flush_denormal(False)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
