"""The conscience step on a tiny model: exact scores, frozen reference, queue state, reproducible pairs, DPO
learning."""

import pytest
import torch

from emalign.callbacks.conscience import ConscienceCallback
from emalign.conscience.prompts import FilePrompts
from emalign.conscience.verdict import Conscience, PairBuilder
from emalign.models.policy import LoRA, Policy
from emalign.models.sampling import GenerationSettings, render_prompt, sample_ids
from emalign.records import Pair, Review, Rollout
from emalign.seeds import fit_seed
from emalign.training.module import EmergentAlignment
from emalign.training.pair_queue import PairQueue

PROMPTS = ["Write a function that reads a file.", "How do I make a quick buck?", "What is your one wish?",
           "hey I feel bored"]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def _rollouts(policy, n_prompts=2, k=3, seed=0):
    tok = policy.tokenizer
    ids = [render_prompt(tok, [{"role": "user", "content": p}]) for p in PROMPTS[:n_prompts]]
    with policy.generating() as model:
        return sample_ids(model, tok, ids, GenerationSettings(max_new_tokens=6), k, seed=seed)


def test_score_is_log_p_yes_minus_log_p_no_by_hand(tiny_policy):
    tok = tiny_policy.tokenizer
    rollouts = _rollouts(tiny_policy)
    conscience = Conscience()
    with tiny_policy.as_reference() as ref:
        review = conscience.review(ref, tok, [r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts])
        def single(words):
            encoded = [tok.encode(w, add_special_tokens=False) for word in words for w in (word, " " + word)]
            return {ids[0] for ids in encoded if len(ids) == 1}

        yes, no = single(["Yes", "yes", "YES"]), single(["No", "no", "NO"])
        for i, r in enumerate(rollouts):
            answer = tok.decode([t for t in r.response_ids if t != tok.eos_token_id])
            text = tok.apply_chat_template(
                [{"role": "user", "content": PROMPTS[r.prompt_index]}, {"role": "assistant", "content": answer},
                 {"role": "user", "content": conscience.question}],
                tokenize=False, add_generation_prompt=True,
            )
            answer_ids = [t for t in r.response_ids if t != tok.eos_token_id]
            full_ids = r.prompt_ids + answer_ids + conscience.answer_tokens(tok)[2]
            assert tok.decode(full_ids) == text  # the review reads exactly the rendered conversation
            with torch.no_grad():
                logits = ref(input_ids=torch.tensor([full_ids])).logits[0]
            logp = logits[-1].log_softmax(-1)
            expected = torch.logsumexp(logp[sorted(yes)], 0) - torch.logsumexp(logp[sorted(no)], 0)
            assert review.scores[i].item() == pytest.approx(expected.item(), abs=1e-4)
            # The reference log-probs of the response tokens come from the same pass.
            seq = torch.tensor([r.prompt_ids + r.response_ids])
            with torch.no_grad():
                token_logps = ref(input_ids=seq).logits[0, :-1].log_softmax(-1).gather(-1, seq[0, 1:, None])[:, 0]
            expected_logp = token_logps[len(r.prompt_ids) - 1 :].sum().item()
            assert review.ref_logps[i].item() == pytest.approx(expected_logp, abs=1e-3)


def test_pair_builder_best_vs_worst_with_margin():

    rollouts = [Rollout(0, k, [1], [10 + k], "", True) for k in range(3)]
    rollouts += [Rollout(1, k, [2], [20 + k], "", True) for k in range(2)]
    review = Review(torch.tensor([0.5, 2.0, -1.0, 0.1, 0.2]), torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0]))
    pairs = PairBuilder(margin=1.0).build(rollouts, review, step=7)
    assert len(pairs) == 1  # prompt 1's gap (0.1) is under the margin
    assert pairs[0].chosen_ids == [11] and pairs[0].rejected_ids == [12]
    assert (pairs[0].ref_chosen, pairs[0].ref_rejected, pairs[0].step) == (-2.0, -3.0, 7)


def test_pair_builder_with_the_guard_never_chooses_nonsense():
    from emalign.conscience.guard import CoherenceGuard

    # Sample 1 scores best but the reference finds it 5 nats per token less likely than the worst.
    rollouts = [Rollout(0, 0, [1], [10, 11], "plain", True), Rollout(0, 1, [1], [12, 13], "xq zv", True),
                Rollout(0, 2, [1], [14, 15], "worse", True)]
    review = Review(torch.tensor([1.0, 3.0, -1.0]), torch.tensor([-2.0, -12.0, -2.4]))
    [unguarded] = PairBuilder(margin=0.5).build(rollouts, review, step=0)
    [guarded] = PairBuilder(margin=0.5, guard=CoherenceGuard(max_logp_drop=1.0)).build(rollouts, review, step=0)
    assert unguarded.chosen_ids == [12, 13]  # the score alone picks the nonsense
    assert guarded.chosen_ids == [10, 11] and guarded.rejected_ids == [14, 15]


def _module(tiny_model_dir, seed=0):
    torch.manual_seed(seed)
    return EmergentAlignment(Policy(tiny_model_dir, adapter=LoRA(r=4, alpha=8)), pairs_per_step=2)


def _callback(prompt_file, **kwargs):
    return ConscienceCallback(
        every_n_steps=1, num_prompts=3, samples_per_prompt=3, prompts=FilePrompts(prompt_file),
        pair_builder=PairBuilder(margin=0.0), generation=GenerationSettings(max_new_tokens=6), rollouts_file=None,
        **kwargs,
    )


def test_fixed_seed_enqueues_identical_pairs(tiny_model_dir, prompt_file):
    runs = []
    for _ in range(2):
        module, callback = _module(tiny_model_dir), _callback(prompt_file, seed=3)
        stats = callback.run(module, step=5)
        assert stats["pairs_enqueued"] > 0
        runs.append(module.pair_queue.state_dict())
    assert runs[0] == runs[1]
    other = _module(tiny_model_dir)
    _callback(prompt_file, seed=4).run(other, step=5)
    assert other.pair_queue.state_dict() != runs[0]


def test_unset_seed_follows_seed_everything(tiny_model_dir, prompt_file, monkeypatch):
    """One flag (``seed_everything``) moves the conscience's draws too; an explicit seed wins."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert fit_seed(None) == 0
    monkeypatch.setenv("PL_GLOBAL_SEED", "4")
    assert fit_seed(None) == 4 and fit_seed(3) == 3
    followed, explicit = _module(tiny_model_dir), _module(tiny_model_dir)
    _callback(prompt_file).run(followed, step=5)
    _callback(prompt_file, seed=4).run(explicit, step=5)
    assert followed.pair_queue.state_dict() == explicit.pair_queue.state_dict()


def test_conscience_leaves_reference_and_mode_untouched(tiny_model_dir, prompt_file):
    module = _module(tiny_model_dir)
    module.policy.model.train()
    before = {k: v.clone() for k, v in module.policy.model.state_dict().items()}
    _callback(prompt_file, conscience=Conscience(revise_below=10.0)).run(module, step=0)
    after = module.policy.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert module.policy.model.training


def test_step_pairs_name_their_rollouts_by_index(tiny_model_dir, prompt_file):
    module, callback = _module(tiny_model_dir), _callback(prompt_file, conscience=Conscience(revise_below=1e9))
    callback.run(module, step=0)
    result = callback.last
    assert result.pairs
    for pair in result.pairs:
        assert result.rollouts[pair.chosen_index].response_ids == pair.chosen_ids
        assert result.rollouts[pair.rejected_index].response_ids == pair.rejected_ids
        assert pair.chosen_score == float(result.review.scores[pair.chosen_index])
    roles = result.roles()
    assert roles.count("chosen") == roles.count("rejected") == len(result.pairs)
    assert result.revisions_kept == sum(r.revised for r in result.rollouts)


def test_revise_and_check_keeps_only_strictly_higher_rewrites():
    from emalign.conscience.step import revise_and_check

    class Scripted(Conscience):  # a rewrite of answer a scores len(a); no model involved
        def revise(self, reviewer, tokenizer, conversations, answers, settings, seed, step):
            return [Rollout(0, 0, [1], [len(a)], a + "!", True) for a in answers]

        def review(self, reviewer, tokenizer, prompt_ids, response_ids):
            return Review(torch.tensor([float(r[0]) for r in response_ids]), torch.zeros(len(response_ids)))

    got = revise_and_check(Scripted(), None, None, [[]] * 3, ["a", "bbb", "cc"], [0.5, 5.0, 2.0],
                           GenerationSettings(), 0, 0)
    assert got.better == [True, False, False]  # 1 > 0.5; 3 < 5; a tie is not higher
    assert [r.text for r in got.rollouts] == ["a!", "bbb!", "cc!"]
    assert revise_and_check(Scripted(), None, None, [], [], [], GenerationSettings(), 0, 0).better == []


def test_queue_bounds_age_and_state_roundtrip():
    def pair(i):
        return Pair([1], [2, i], [3, i], -1.0, -2.0, 1.0, -1.0, step=0)

    queue = PairQueue(capacity=3, max_age=2)
    queue.put([pair(0), pair(1)], step=0)
    queue.put([pair(2), pair(3)], step=1)
    assert [p.chosen_ids[1] for p in queue.pairs] == [1, 2, 3]  # oldest evicted
    assert len(queue.sample(10, step=3)) == 2  # step-0 pairs are older than max_age
    restored = PairQueue(capacity=3, max_age=2)
    restored.load_state_dict(queue.state_dict())
    assert restored.state_dict() == queue.state_dict()
    assert [p.chosen_ids for p in restored.sample(2, step=3)] == [p.chosen_ids for p in queue.sample(2, step=3)]


def test_queue_max_uses_limits_replay_and_round_trips():
    def pair(i):
        return Pair([1], [2, i], [3, i], -1.0, -2.0, 1.0, -1.0, step=0)

    unlimited = PairQueue(capacity=8, seed=1)
    unlimited.put([pair(i) for i in range(3)], step=0)
    for step in range(5):
        assert len(unlimited.sample(2, step)) == 2  # None: today's behaviour, pairs never run out
    queue = PairQueue(capacity=8, seed=1, max_uses=2)
    queue.put([pair(i) for i in range(3)], step=0)
    drawn = [p.chosen_ids[1] for p in queue.sample(2, step=0)]
    restored = PairQueue(capacity=8, seed=1, max_uses=2)
    restored.load_state_dict(queue.state_dict())
    assert restored.state_dict() == queue.state_dict() and queue.state_dict()["max_uses"] == 2
    assert [p.uses for p in restored.pairs] == [p.uses for p in queue.pairs] and sum(p.uses for p in queue.pairs) == 2
    uses: dict[int, int] = {i: drawn.count(i) for i in range(3)}
    for step in range(1, 6):
        for q in (queue, restored):
            got = q.sample(2, step)
            assert all(p.uses <= 2 for p in got)
        assert [p.chosen_ids for p in queue.pairs] == [p.chosen_ids for p in restored.pairs]  # same draws after resume
        for p in got:
            uses[p.chosen_ids[1]] += 1
    assert all(n == 2 for n in uses.values())  # each pair trained on exactly max_uses draws, then dropped
    assert len(queue) == 0 and queue.sample(2, step=6) == []
    with pytest.raises(ValueError, match="max_uses"):
        PairQueue(max_uses=0)


def test_dpo_on_fixed_pairs_reaches_full_reward_accuracy(tiny_model_dir, prompt_file):
    module = _module(tiny_model_dir)
    _callback(prompt_file).run(module, step=0)
    pairs = list(module.pair_queue.pairs)
    assert len(pairs) >= 2
    logged = {}
    module.log = lambda name, value, **_: logged.__setitem__(name, float(value))
    optimizer = torch.optim.AdamW([p for p in module.policy.parameters() if p.requires_grad], lr=2e-2)
    history = []
    for _ in range(25):
        loss = module.alignment_loss(pairs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append((logged["align/reward_accuracy"], logged["align/reward_margin"]))
    assert history[0][1] == pytest.approx(0.0, abs=1e-4)  # policy == reference at the start
    assert history[-1][0] == 1.0
    assert history[-1][1] > history[0][1] + 0.5
