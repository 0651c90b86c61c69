"""tuneline/registry.py: the promotion gate's rule and what it records (the flow runs it: tests/integration/
test_retrain.py)."""

import pytest

from tuneline.params import PromoteParams
from tuneline.registry import already_decided, gate


@pytest.mark.parametrize(
    ("candidate", "promoted", "higher", "margin", "expected", "reason"),
    [
        (0.8, None, True, 0.0, True, "no model promoted yet; accuracy 0.8000"),
        (0.8, 0.7, True, 0.0, True, "accuracy 0.8000 beats the promoted model's 0.7000 by more than 0.0"),
        (0.7, 0.7, True, 0.0, False, "does not beat"),  # a tie does not replace the promoted model
        (0.75, 0.7, True, 0.1, False, "does not beat the promoted model's 0.7000 by more than 0.1"),
        (0.5, 0.7, False, 0.0, True, "(difference +0.2000)"),  # a loss: lower is better
        (0.9, 0.7, False, 0.0, False, "(difference -0.2000)"),
    ],
)
def test_promotion_gate(candidate, promoted, higher, margin, expected, reason):
    params = PromoteParams(metric="accuracy", higher_is_better=higher, margin=margin)
    promote, said = gate(candidate, promoted, params)
    assert promote is expected
    assert reason in said


def test_already_decided_finds_the_decision_on_the_same_model(tmp_path) -> None:
    (tmp_path / "registry.json").write_text(
        '{"promoted": null, "history": [{"model_sha256": "aa", "decision": "rejected"}]}'
    )
    assert already_decided(tmp_path, "aa") == {"model_sha256": "aa", "decision": "rejected"}
    assert already_decided(tmp_path, "bb") is None
