"""Each preference loss equals its paper's formula computed by hand on fixed log-probs."""

import math

import pytest
import torch

from emalign.training.losses import IPO, HingeDPO, RobustDPO, SigmoidDPO

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


@pytest.mark.parametrize("normalized", [True, False])
def test_ipo_length_normalized_is_trls_ipo(tiny_policy, normalized):
    """TRL's IPO (trl/trainer/dpo_trainer.py, ``loss_type="ipo"``): ``concatenated_forward`` divides each
    completion's summed token log-probs by its length, for the policy and the reference alike, and
    ``dpo_loss`` takes ``(logits - 1 / (2 * beta)) ** 2`` with ``logits = (pi_c - pi_r) - (ref_c - ref_r)``.
    Written out here from the model's own logits: TRL is a bench-only extra, not a test dependency."""
    from emalign.records import Pair
    from emalign.training.module import EmergentAlignment

    beta = 0.1
    module = EmergentAlignment(tiny_policy, preference_loss=IPO(beta=beta, length_normalized=normalized))
    module.log = lambda *a, **k: None
    pairs = [
        Pair([1, 2, 3], [4, 5], [6, 7, 8, 9], -5.0, -11.0, 0.0, 0.0, 0),
        Pair([1, 2], [3], [4, 5, 6], -2.0, -7.5, 0.0, 0.0, 0),
    ]
    with torch.no_grad():
        loss = module.alignment_loss(pairs)

        def logps(prompt, completion):  # TRL: log_softmax of the logits, gathered at the completion tokens
            ids = torch.tensor([prompt + completion])
            per_token = tiny_policy.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
            per_token = per_token.gather(-1, ids[0, len(prompt) :, None]).squeeze(-1)
            return per_token.sum() / (len(completion) if normalized else 1)

        expected = []
        for p in pairs:
            n_c, n_r = (len(p.chosen_ids), len(p.rejected_ids)) if normalized else (1, 1)
            logits = logps(p.prompt_ids, p.chosen_ids) - logps(p.prompt_ids, p.rejected_ids)
            logits = logits - (p.ref_chosen / n_c - p.ref_rejected / n_r)
            expected.append((logits - 1 / (2 * beta)) ** 2)
    assert float(loss) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)
    assert IPO().length_normalized is False and SigmoidDPO().length_normalized is False  # sums stay the default
