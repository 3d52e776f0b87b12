from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_model, with_scaled_logits
from optimum_evopress import EvoPressConfig
from optimum_evopress.distributed import ProcessGroup
from optimum_evopress.fitness import FitnessEvaluator, draw_minibatch, length_dependent_rope, teacher_cache_bytes
from optimum_evopress.methods import DepthPruning
from optimum_evopress.scoring import CandidateScorer

SEQUENCES = torch.randint(2, 300, (6, 16), generator=torch.Generator().manual_seed(0))


def reference_kl(teacher_logits, student_logits):
    p = F.log_softmax(teacher_logits.double(), -1)
    q = F.log_softmax(student_logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.fixture
def setup():
    model = make_model()
    with torch.no_grad():
        dense_logits = model(input_ids=SEQUENCES).logits
    method = DepthPruning(model, EvoPressConfig(target=0.34))
    return model, dense_logits, method


def with_head_bias(model):
    """`model` with a non-zero output-head bias (as some architectures have)."""
    head = model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.randn(head.out_features, generator=torch.Generator().manual_seed(1)))
    return model


@pytest.mark.parametrize("model_type, overrides, change, projected", [
    ("llama", {}, None, True), ("llama", {"tie_word_embeddings": True}, None, True),
    ("llama", {}, with_head_bias, True), ("qwen2", {}, None, True),
    # Logits that are not the linear head of the last hidden states: full probabilities are cached instead.
    ("gemma3_text", {"final_logit_softcapping": 30.0}, None, False), ("llama", {}, with_scaled_logits, False)])
def test_kl_is_zero_for_the_dense_model_and_exact_otherwise(model_type, overrides, change, projected):
    model = make_model(model_type, **overrides)
    if change is not None:
        model = change(model)
    with torch.no_grad():
        dense_logits = model(input_ids=SEQUENCES).logits
    method = DepthPruning(model, EvoPressConfig(target=0.34))
    evaluator = FitnessEvaluator(model, SEQUENCES, "kl", batch_size=4, layers=model.model.layers)
    evaluator.cache_teacher(progress=False)
    hidden = model.config.hidden_size if projected else None
    assert evaluator.cache_bytes() == teacher_cache_bytes("kl", SEQUENCES.numel(), 320, 0, hidden)
    everything = [(i, 16) for i in range(6)]
    assert abs(evaluator.score(everything)) < 1e-5
    method.set_levels((0, 1, 0, 1, 0, 0))
    if projected:  # the model stops at its last hidden states: the fitness applies the head itself
        calls = []
        hook = model.get_output_embeddings().register_forward_hook(lambda *args: calls.append(1))
        evaluator.score(everything)
        hook.remove()
        assert calls == []
    with torch.no_grad():
        student_logits = model(input_ids=SEQUENCES).logits
    expected = reference_kl(dense_logits, student_logits)
    assert expected > 0.01
    # Projected: the exact KL divergence (float32 rounding only); full probabilities: float16-rounded teacher.
    tolerance = 1e-5 if projected else 2e-3
    assert evaluator.score(everything) == pytest.approx(expected, rel=tolerance)
    # A partial sequence scores the first tokens only (causal models: same as the full sequence's prefix).
    assert evaluator.score([(2, 5)]) == pytest.approx(reference_kl(dense_logits[2, :5], student_logits[2, :5]),
                                                        rel=tolerance)
    # Prefix reuse gives the same value.
    batch = everything[:3] + [(4, 9)]
    method.set_levels((0, 0, 0, 1, 0, 0))
    evaluator.record_prefix(batch)
    assert evaluator.score(batch, start_block=3) == evaluator.score(batch)


def test_kl_without_the_head_shortcut_caches_full_probabilities_and_agrees(setup, monkeypatch):
    model, _, method = setup
    values = {}
    for shortcut in (True, False):
        monkeypatch.setattr(FitnessEvaluator, "head_shortcuts", shortcut)
        method.reset()
        evaluator = FitnessEvaluator(model, SEQUENCES, "kl", batch_size=4)
        evaluator.cache_teacher(progress=False)
        method.set_levels((0, 1, 0, 0, 1, 0))
        values[shortcut] = evaluator.score([(i, 16) for i in range(6)])
        assert (evaluator.teacher_probs is None) == shortcut
    assert values[False] == pytest.approx(values[True], rel=2e-3)


def test_topk_kl_is_a_lower_bound_that_becomes_exact_with_the_whole_vocabulary(setup):
    model, dense_logits, method = setup
    batch = [(i, 16) for i in range(6)]
    scores = {}
    for k in (8, 320):
        evaluator = FitnessEvaluator(model, SEQUENCES, "topk_kl", topk=k, batch_size=4)
        method.reset()
        evaluator.cache_teacher(progress=False)
        assert evaluator.cache_bytes() == teacher_cache_bytes("topk_kl", SEQUENCES.numel(), 320, k)
        assert abs(evaluator.score(batch)) < 1e-4
        method.set_levels((0, 1, 0, 1, 0, 0))
        scores[k] = evaluator.score(batch)
    with torch.no_grad():
        full = reference_kl(dense_logits, model(input_ids=SEQUENCES).logits)
    assert 0 < scores[8] <= full + 1e-5
    assert scores[320] == pytest.approx(full, rel=1e-3)


def reference_renormalized_kl(teacher_logits, student_logits, k):
    """KL divergence of the two distributions conditioned on the teacher's top k tokens, from full logits."""
    top = teacher_logits.double().topk(k, -1).indices
    p = F.log_softmax(teacher_logits.double().gather(-1, top), -1)
    q = F.log_softmax(student_logits.double().gather(-1, top), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("model_type, overrides", [("llama", {}), ("llama", {"tie_word_embeddings": True}),
                                                   ("gemma3_text", {"final_logit_softcapping": 2.0})])
def test_renormalized_topk_kl_reads_only_head_rows_and_equals_the_conditional_kl(model_type, overrides, monkeypatch):
    model = make_model(model_type, **overrides)
    with torch.no_grad():
        dense_logits = model(input_ids=SEQUENCES).logits
    method = DepthPruning(model, EvoPressConfig(target=0.34))
    batch = [(i, 16) for i in range(6)] + [(2, 7)]
    evaluator = FitnessEvaluator(model, SEQUENCES, "topk_kl_renormalized", topk=8, batch_size=4,
                                 layers=model.model.layers)
    evaluator.cache_teacher(progress=False)
    assert evaluator.cache_bytes() == teacher_cache_bytes("topk_kl_renormalized", SEQUENCES.numel(), 320, 8)
    assert abs(evaluator.score(batch)) < 1e-5
    method.set_levels((0, 1, 0, 1, 0, 0))
    # The full output head never runs while scoring: only its rows at the teacher's top k are read.
    calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *args: calls.append(1))
    value = evaluator.score(batch)
    hook.remove()
    assert calls == []
    with torch.no_grad():
        student_logits = model(input_ids=SEQUENCES).logits
    expected = reference_renormalized_kl(dense_logits, student_logits, 8)
    assert expected > 0.01
    assert evaluator.score(batch[:6]) == pytest.approx(expected, rel=1e-4)
    assert value == pytest.approx((6 * 16 * expected + 7 * reference_renormalized_kl(
        dense_logits[2, :7], student_logits[2, :7], 8)) / (6 * 16 + 7), rel=1e-4)
    # Weighted by the teacher's top-k mass it is a lower bound of the full KL divergence, per token.
    top = dense_logits.topk(8, -1).indices
    mass = F.softmax(dense_logits.double(), -1).gather(-1, top).sum(-1)
    p = F.log_softmax(dense_logits.double().gather(-1, top), -1)
    q = F.log_softmax(student_logits.double().gather(-1, top), -1)
    conditional = (p.exp() * (p - q)).sum(-1)
    full = (F.softmax(dense_logits.double(), -1) * (F.log_softmax(dense_logits.double(), -1)
                                                    - F.log_softmax(student_logits.double(), -1))).sum(-1)
    assert bool((mass * conditional <= full + 1e-9).all())
    # Computing every head row and gathering (the straightforward way) gives the same value; so does prefix reuse.
    method.set_levels((0, 0, 0, 1, 0, 0))
    evaluator.record_prefix(batch[:6])
    resumed = evaluator.score(batch[:6], start_block=3)
    assert resumed == evaluator.score(batch[:6])
    monkeypatch.setattr(FitnessEvaluator, "head_shortcuts", False)
    assert evaluator.score(batch[:6]) == pytest.approx(resumed, rel=1e-5)


def test_renormalized_topk_kl_refuses_a_model_whose_logits_are_not_its_head_rows():
    model = with_scaled_logits(make_model())
    evaluator = FitnessEvaluator(model, SEQUENCES, "topk_kl_renormalized", topk=8)
    with pytest.raises(ValueError, match="differ from the model's logits.*fitness='topk_kl'"):
        evaluator.check_output_head()
    with pytest.raises(ValueError, match="differ from the model's logits"):
        evaluator.cache_teacher(progress=False)


def test_perplexity_fitness_is_the_mean_negative_log_likelihood(setup):
    model, _, method = setup
    method.set_levels((1, 0, 0, 0, 0, 1))
    evaluator = FitnessEvaluator(model, SEQUENCES, "ppl", batch_size=4)
    with torch.no_grad():
        out = model(input_ids=SEQUENCES).logits
    expected = F.cross_entropy(out[:, :-1].flatten(0, 1), SEQUENCES[:, 1:].flatten()).item()
    assert evaluator.score([(i, 16) for i in range(6)]) == pytest.approx(expected, rel=1e-5)


def test_minibatches_hold_exactly_the_tokens_asked_for():
    rng = np.random.default_rng(0)
    for tokens in (1, 16, 40, 96):
        batch = draw_minibatch(6, 16, tokens, rng)
        assert sum(n for _, n in batch) == tokens
        assert len({i for i, _ in batch}) == len(batch)
    with pytest.raises(ValueError, match="97 tokens"):
        draw_minibatch(6, 16, 97, rng)


def test_score_before_caching_is_an_error(setup):
    with pytest.raises(RuntimeError, match="cache_teacher"):
        FitnessEvaluator(setup[0], SEQUENCES, "kl").score([(0, 4)])


@pytest.mark.parametrize("budget", [None, 1])
def test_prefix_reuse_gives_the_full_forward_value_bit_for_bit(budget):
    model = make_model()
    layers = model.model.layers
    block_input_bytes = 32 * 4 * 6 * 16  # hidden size x float32 x calibration tokens
    evaluator = FitnessEvaluator(model, SEQUENCES, "kl", batch_size=4, layers=layers,
                                 prefix_budget=None if budget is None else 2 * block_input_bytes)
    evaluator.cache_teacher(progress=False)
    batch = [(0, 16), (3, 16), (5, 16), (1, 16), (2, 16), (4, 10)]  # three forward groups
    method = DepthPruning(model, EvoPressConfig(target=0.34))
    method.set_levels((0, 1, 0, 0, 0, 0))
    recorded = evaluator.record_prefix(batch)
    assert recorded == evaluator.score(batch)
    kept = sorted(evaluator._kept)
    # Budget for two block inputs of the calibration set: every third block input kept; else all of them.
    assert kept == ([3] if budget else [1, 2, 3, 4, 5])
    for changed in (2, 4, 5):
        method.set_levels((0, 1, 0, 0, 0, 0)[:changed] + (1,) + (0,) * (5 - changed))
        evaluator.blocks_run = 0
        resumed = evaluator.score(batch, start_block=changed)
        assert evaluator.blocks_run == 3 * (6 - max(b for b in [0, *kept] if b <= changed))
        evaluator.blocks_run = 0
        assert resumed == evaluator.score(batch) and evaluator.blocks_run == 3 * 6
    # Sequences the reference was not recorded on (here: sequence 3 at 10 tokens) run from the embeddings.
    evaluator.blocks_run = 0
    resumed = evaluator.score([(0, 16), (3, 10)], start_block=5)
    assert evaluator.blocks_run == 2 * 6 - (3 if budget else 5)
    assert resumed == evaluator.score([(0, 16), (3, 10)])
    evaluator.clear_prefix()
    assert evaluator._kept == {}
    assert evaluator.score(batch, start_block=3) == evaluator.score(batch)


def test_the_reference_is_run_once_per_sequence_and_again_only_after_its_first_change():
    model = make_model()
    evaluator = FitnessEvaluator(model, SEQUENCES, "kl", batch_size=4, layers=model.model.layers)
    evaluator.cache_teacher(progress=False)
    method = DepthPruning(model, EvoPressConfig(target=0.34))
    reference = (0, 1, 0, 0, 0, 0)
    method.set_levels(reference)
    first, second = [(0, 16), (3, 16), (5, 10)], [(3, 16), (1, 16), (5, 16), (2, 7)]
    evaluator.record_prefix(first)
    assert evaluator.prefix_work(first) == 0
    assert evaluator.prefix_work(second) == (16 + 16 + 7) * 6  # sequence 5 was recorded at 10 tokens only
    evaluator.blocks_run = 0
    assert evaluator.record_prefix(second) == evaluator.score(second)
    assert evaluator.blocks_run == 2 * 6 + 2 * 6  # two groups recorded (16 and 7 tokens), then two scored
    # Nothing left to run: the reference's score comes from its kept per-token values, bit for bit.
    evaluator.blocks_run = 0
    assert evaluator.record_prefix(first[:2]) == evaluator.score(first[:2])
    assert evaluator.blocks_run == 1 * 6
    # The reference changes first in block 4: the kept inputs of blocks 1-4 stay, recording runs blocks 4 and 5.
    reference = (0, 1, 0, 0, 1, 0)
    method.set_levels(reference)
    evaluator.invalidate_prefix(4)
    assert evaluator.prefix_work(second) == (16 + 16 + 16 + 7) * 2
    evaluator.blocks_run = 0
    recorded = evaluator.record_prefix(second)
    assert evaluator.blocks_run == 2 * 2  # the 16-token group and the 7-token one, from block 4
    assert recorded == evaluator.score(second)
    # A candidate of the new reference (first change in block 5) resumes from its kept inputs.
    method.set_levels((0, 1, 0, 0, 1, 1))
    evaluator.blocks_run = 0
    assert evaluator.score(second, start_block=5) == evaluator.score(second)
    assert evaluator.blocks_run == 2 * 1 + 2 * 6
    evaluator.invalidate_prefix(0)
    assert evaluator.prefix_work(second) == (16 + 16 + 16 + 7) * 6


def test_the_scorer_keeps_the_parents_inputs_across_calls_until_the_parent_changes():
    model = make_model()
    method = DepthPruning(model, EvoPressConfig(target=0.34))
    evaluator = FitnessEvaluator(model, SEQUENCES, "kl", batch_size=4, layers=model.model.layers)
    evaluator.cache_teacher(progress=False)
    kept = CandidateScorer(method, evaluator, ProcessGroup())
    plain = CandidateScorer(method, evaluator, ProcessGroup(), reuse_prefix=False)
    everything = [(i, 16) for i in range(6)]
    parent, new_parent = (0, 1, 0, 0, 1, 0), (0, 1, 0, 0, 0, 1)  # the new one differs first in block 4
    calls = [  # (candidates, tokens, reference, block-tokens the parent has left to run on every sequence after)
        ([(1, 0, 0, 0, 1, 0), (0, 1, 0, 1, 0, 0), parent], 32, parent, 4 * 16 * 6),
        ([(0, 1, 1, 0, 0, 0), (0, 1, 0, 0, 1, 1)], 96, parent, 0),
        ([(0, 1, 1, 0, 0, 0), (0, 0, 0, 1, 0, 1), (0, 1, 0, 1, 0, 0), new_parent], 32, new_parent, 4 * 16 * 2),
    ]
    for seed, (candidates, tokens, reference, left) in enumerate(calls):
        scores = kept(candidates, tokens, np.random.default_rng(seed), reference)
        assert evaluator.prefix_work(everything) == left
        # Bit for bit what every candidate's full forward pass gives, the parent's own score included.
        assert scores == plain(candidates, tokens, np.random.default_rng(seed), reference)


def test_stacked_states_score_as_each_state_alone():
    model = make_model()
    evaluator = FitnessEvaluator(model, SEQUENCES, "kl", batch_size=4, layers=model.model.layers)
    evaluator.cache_teacher(progress=False)
    batch = [(0, 16), (3, 16), (5, 16), (1, 16), (2, 16), (4, 10)]  # three forward groups
    method = DepthPruning(model, EvoPressConfig(target=0.34))
    # The first is the reference; the others differ from it first in blocks 4 and 2.
    states = [(0, 1, 0, 0, 1, 0), (0, 1, 0, 0, 0, 1), (0, 1, 1, 0, 0, 0)]
    alone = []
    for state in states:
        method.set_levels(state)
        alone.append(evaluator.score(batch))
    assert len(set(alone)) == 3
    method.set_levels(states[0])
    evaluator.record_prefix(batch)
    with method.stacked(states):
        evaluator.blocks_run = 0
        together = evaluator.score_stacked(batch, 3, start_block=2)
    assert together == pytest.approx(alone, rel=1e-6)
    assert evaluator.blocks_run == 3 * 3 * (6 - 2)  # groups x stacked states x blocks from the replayed one


@pytest.mark.parametrize("kind, copies", [("kl", 2), ("kl", 1), ("topk_kl_renormalized", 5)])
def test_stack_limit_keeps_the_stacked_outputs_within_the_budget(kind, copies):
    model = make_model()
    batch = [(0, 16), (3, 16), (5, 16), (1, 16), (2, 10)]  # the largest group: 4 x 16 tokens
    width = 320 if kind == "kl" else 32  # logits, or last hidden states when only head rows are needed
    per_copy = 4 * 16 * 4 * (2 * width + 4 * 64)
    evaluator = FitnessEvaluator(model, SEQUENCES, kind, batch_size=4, prefix_budget=copies * per_copy + 1)
    assert evaluator.stack_limit(batch) == copies


def longrope_phi3():
    """A tiny Phi3 with `longrope` (as Phi-3.5/Phi-4-mini): long factors beyond 16 positions."""
    return make_model("phi3", num_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=128, original_max_position_embeddings=16,
                      rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "factor": 8.0,
                                       "long_factor": [1.0 + i for i in range(8)], "short_factor": [1.0] * 8})


class _Dense:
    """A method that leaves the model dense whatever the levels."""

    def set_levels(self, assignment):
        pass


@pytest.mark.parametrize("model_type", ["phi3", "llama"])
def test_length_dependent_rope_scores_whole_sequences(model_type):
    sequences = torch.randint(2, 300, (6, 32), generator=torch.Generator().manual_seed(0))
    model = longrope_phi3() if model_type == "phi3" else make_model(num_layers=2)
    evaluator = FitnessEvaluator(model, sequences, "kl", batch_size=4, layers=model.model.layers)
    evaluator.cache_teacher(progress=False)
    longrope = model_type == "phi3"
    assert evaluator.whole_sequences == longrope
    if longrope:  # why: a 10-token prefix runs with the short factors, its full sequence with the long ones
        assert evaluator.score([(0, 10)]) > 0.01
    batches = []
    plain_score = evaluator.score
    evaluator.score = lambda batch, start_block=0: batches.append(batch) or plain_score(batch, start_block)
    scorer = CandidateScorer(_Dense(), evaluator, ProcessGroup(), reuse_prefix=False)
    for tokens in (10, 32, 50, 64, 100):
        assert abs(scorer([(0,)], tokens, np.random.default_rng(tokens))[0]) < 1e-5  # the dense model: KL ~0
        # The same sequences are drawn either way; only the last is whole or partial.
        drawn = draw_minibatch(6, 32, tokens, np.random.default_rng(tokens))
        assert [i for i, _ in batches[-1]] == [i for i, _ in drawn]
        assert batches[-1] == ([(i, 32) for i, _ in drawn] if longrope else drawn)


def test_length_dependent_rope_types():
    def config(max_position_embeddings=16, **rope):
        return SimpleNamespace(rope_parameters=rope, max_position_embeddings=max_position_embeddings)

    assert length_dependent_rope(config(rope_type="dynamic", factor=2.0), 17) == "dynamic"
    assert length_dependent_rope(config(rope_type="dynamic", factor=2.0), 16) is None
    longrope = config(128, rope_type="longrope", original_max_position_embeddings=16)
    assert length_dependent_rope(longrope, 17) == "longrope" and length_dependent_rope(longrope, 16) is None
    assert length_dependent_rope(config(rope_type="llama3", factor=8.0), 64) is None
    assert length_dependent_rope(config(rope_type="default"), 64) is None
    # One setting per layer type (as in Gemma 3).
    per_layer = config(full_attention={"rope_type": "dynamic", "factor": 2.0},
                       sliding_attention={"rope_type": "default"})
    assert length_dependent_rope(per_layer, 32) == "dynamic"
    assert length_dependent_rope(SimpleNamespace(rope_parameters=None), 32) is None
