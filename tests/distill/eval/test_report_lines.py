"""The training-loss plot tells offline from on-policy stages and shows the on-policy KL."""

from __future__ import annotations

from distill.eval.report import loss_lines, plot_training_loss


def test_loss_lines_label_each_stage_offline_or_on_policy_and_add_the_sampled_kl():
    metrics = [
        {"step": 5, "stage_name": "kd", "loss": 2.0},
        {"step": 10, "stage_name": "kd", "loss": 1.5},
        {"event": "heldout", "step": 10, "stage_name": "kd", "kl": 1.4},
        {"step": 15, "stage_name": "gkd", "loss": 0.9, "on_policy": {"labelled_tokens": 40, "kl_sampled": 0.7}},
        {"step": 20, "stage_name": "gkd", "loss": 0.8, "on_policy": {"labelled_tokens": 0, "kl_sampled": 0.0}},
        {"step": 25, "stage_name": "gkd", "loss": 0.7, "on_policy": {"labelled_tokens": 38, "kl_sampled": 0.5}},
        {"event": "heldout", "step": 25, "stage_name": "gkd", "kl": 1.1},
    ]
    lines = {line["label"]: line for line in loss_lines(metrics)}
    assert list(lines) == ["loss: kd (offline)", "loss: gkd (on-policy)", "on-policy KL: gkd", "held-out KL"]
    assert lines["loss: gkd (on-policy)"]["values"] == [0.9, 0.8, 0.7]
    # a window with no sampled micro-batch (mixed stages) has no on-policy KL point, not a 0
    assert (lines["on-policy KL: gkd"]["steps"], lines["on-policy KL: gkd"]["values"]) == ([15, 25], [0.7, 0.5])
    assert lines["held-out KL"]["values"] == [1.4, 1.1]
    assert plot_training_loss(metrics)[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_training_loss([{"event": "heldout", "step": 1, "kl": 1.0}]) is None
