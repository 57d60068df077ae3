"""Checkpoint layouts (numpy only): moshi's newer per-step layout rewritten to the published one."""

import numpy as np
import pytest

from xbackend.errors import XBackendError
from xbackend.capture.models import to_published_layout


def test_to_published_layout_concatenates_steps_in_order():
    state = {
        "depformer.layers.0.self_attn.in_projs.1.weight": np.full((6, 2), 1.0),
        "depformer.layers.0.self_attn.in_projs.0.weight": np.full((6, 2), 0.0),
        "depformer.layers.0.self_attn.out_projs.0.weight": np.eye(2),
        "depformer.layers.0.self_attn.out_projs.1.weight": 2 * np.eye(2),
        "transformer.layers.0.self_attn.in_projs.0.weight": np.ones((6, 2)),
        "out_norm.alpha": np.ones((1, 1, 2)),
    }
    out = to_published_layout(state)
    assert sorted(out) == ["depformer.layers.0.self_attn.in_proj_weight", "depformer.layers.0.self_attn.out_proj.weight",
                           "out_norm.alpha", "transformer.layers.0.self_attn.in_proj_weight"]
    assert out["depformer.layers.0.self_attn.in_proj_weight"].shape == (12, 2)
    assert out["depformer.layers.0.self_attn.in_proj_weight"][6:].min() == 1.0  # step 1 after step 0
    np.testing.assert_array_equal(out["depformer.layers.0.self_attn.out_proj.weight"][2:], 2 * np.eye(2))
    with pytest.raises(XBackendError, match="without gaps"):
        to_published_layout({"a.self_attn.in_projs.0.weight": np.ones(1), "a.self_attn.in_projs.2.weight": np.ones(1)})
