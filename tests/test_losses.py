"""Each preference loss equals its paper's formula computed by hand on fixed log-probs."""

import math

import pytest
import torch

from emalign.losses import IPO, HingeDPO, RobustDPO, SigmoidDPO

PI_C, PI_R, REF_C, REF_R = [-10.0, -4.0], [-12.0, -3.0], [-11.0, -5.0], [-11.5, -2.5]
BETA = 0.5


def _h(i):
    return (PI_C[i] - REF_C[i]) - (PI_R[i] - REF_R[i])


def _sig(x):
    return 1 / (1 + math.exp(-x))


def _run(loss):
    t = [torch.tensor(v) for v in (PI_C, PI_R, REF_C, REF_R)]
    return [x.tolist() for x in loss(*t)]


@pytest.mark.parametrize(
    "loss, formula",
    [
        (SigmoidDPO(beta=BETA), lambda h: -math.log(_sig(BETA * h))),
        (IPO(beta=BETA), lambda h: (h - 1 / (2 * BETA)) ** 2),
        (HingeDPO(beta=BETA), lambda h: max(0.0, 1 - BETA * h)),
        (
            RobustDPO(beta=BETA, label_smoothing=0.2),
            lambda h: (-(0.8) * math.log(_sig(BETA * h)) + 0.2 * math.log(_sig(-BETA * h))) / (1 - 0.4),
        ),
    ],
)
def test_loss_matches_hand_computation(loss, formula):
    losses, chosen, rejected = _run(loss)
    for i in range(2):
        assert losses[i] == pytest.approx(formula(_h(i)), rel=1e-5)
        assert chosen[i] == pytest.approx(BETA * (PI_C[i] - REF_C[i]), rel=1e-5)
        assert rejected[i] == pytest.approx(BETA * (PI_R[i] - REF_R[i]), rel=1e-5)


def test_robust_rejects_bad_smoothing():
    with pytest.raises(ValueError):
        RobustDPO(label_smoothing=0.5)
