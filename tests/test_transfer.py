"""transfer.py: host values of any kind into the ring's tensors."""

from __future__ import annotations

import numpy as np
import torch

from worldmodel.replay import ReplayBuffer
from worldmodel.transfer import host_array


def test_a_tensor_that_requires_grad_is_stored_as_its_values():
    """A policy or model output written straight from autograd (a planner's action, a predicted obs): numpy cannot
    read a tensor that requires grad, so it is detached first rather than refused."""
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    np.testing.assert_array_equal(host_array(x * 2, np.float32), [2.0, 4.0, 6.0])
    buf = ReplayBuffer(4, obs_dim=3, action_dim=1)
    buf.add(obs=x * 2, action=x[:1], reward=x.sum(), next_obs=x * 3, terminated=False, truncated=False)
    np.testing.assert_array_equal(buf[:]["obs"], [[2.0, 4.0, 6.0]])
    assert buf[:]["reward"].tolist() == [6.0]
