"""tools/plan.py: its byte counts are what a run allocates."""
import model as M
from tools import plan as P


def test_plan_weight_bytes_are_what_a_run_allocates():
    model = M.build_sphinx(M.sphinx_config("tiny"))
    p = P.plan(model.cfg, weight_bytes=4)
    assert p["weights"] == sum(t.numel() * t.element_size() for t in model.parameters())
    # The tiny model fits in one 32 MB bucket: its gradients and that bucket's fp32 flat buffer.
    assert p["grads_held"] == 2 * 4 * sum(t.numel() for t in model.parameters() if t.requires_grad)
    assert p["trainable"] + p["frozen"] == sum(t.numel() for t in model.parameters())
    # More DP ranks shrink only the ZeRO-2 state; activation checkpointing only the activations.
    q = P.plan(model.cfg, dp=4, weight_bytes=4, checkpointing=True)
    assert q["weights"] == p["weights"] and abs(q["zero2_state"] - p["zero2_state"] / 4) <= 16 * 4
    assert q["activations"] < p["activations"]
