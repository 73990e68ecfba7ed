"""Guards found by a hostile-user pass: inputs that trained nothing, read other data, or lost a sample, and
still reported a number. Each test reproduces one and expects a refusal that names the problem."""
from __future__ import annotations

import pytest

from regcache.probe import ProbeConfig, ProbeError


@pytest.mark.parametrize("bad", [
    {"iterations": 0}, {"iterations": -5}, {"lrs": ()}, {"lrs": (-1.0,)}, {"wds": (-1.0,)}, {"batch_size": 0},
    {"val_fraction": 0.99}, {"val_fraction": 0.0}, {"stream_window": 0}, {"momentum": 1.0},
])
def test_settings_that_train_nothing_or_backwards_are_refused(bad):
    with pytest.raises(ProbeError, match="invalid"):
        ProbeConfig(features=["cls"], **bad)
    ProbeConfig(features=["cls"])  # the defaults pass
