"""Tests of bond.tasks: the built-in tasks, their rewards, and their TFDS prompt sets.

Monte-Carlo checks use fixed seeds and a 5-sigma band of the estimator's binomial standard
deviation sqrt(p (1 - p) / n) (plus one count of slack for rare categories): a correct sampler
fails with probability far below 1e-5 per check, a wrong one by design shows many sigmas.
"""

import collections
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond.exact import enumerate_responses
from bond.tasks import (
    EOS_ID,
    TASK_NAMES,
    Prompts,
    counted_response_mask,
    get_task,
    layout,
    sample_chain,
)
from bond.tasks import prompts as prompt_sets
from bond.tasks import synthetic_language as synthetic
from bond.tasks import toy_language as toy

TASKS = [get_task(name) for name in TASK_NAMES]


def _counted_lengths(response_mask: np.ndarray) -> np.ndarray:
    return response_mask.sum(-1).astype(int)


# ----------------------------------------------------------------------------------------
# Every task: shapes, determinism, layout, reward contract.


@pytest.mark.parametrize("task", TASKS, ids=TASK_NAMES)
def test_static_shape(task):
    assert task.eos_id == EOS_ID == 0
    assert task.sequence_length == task.prompt_length + task.max_response_length
    assert get_task(task.name) is task
    if task.name == "toy_language":
        assert (task.vocab_size, task.prompt_length, task.max_response_length) == (9, 2, 5)
    else:
        assert task.vocab_size >= 128 and task.max_response_length >= 16


def test_unknown_task_and_bad_arguments_raise():
    with pytest.raises(ValueError, match="task="):
        get_task("imdb")
    with pytest.raises(ValueError, match="split="):
        toy.prompts("validation", 4, 0)
    with pytest.raises(ValueError, match="num="):
        toy.prompts("train", -1, 0)
    with pytest.raises(ValueError, match="seed="):
        synthetic.pretraining_corpus(4, -3)


@pytest.mark.parametrize("task", TASKS, ids=TASK_NAMES)
def test_prompts_deterministic_left_padded(task):
    batch = task.prompts("train", 300, 7)
    again = task.prompts("train", 300, 7)
    np.testing.assert_array_equal(batch.tokens, again.tokens)
    np.testing.assert_array_equal(batch.mask, again.mask)
    assert not np.array_equal(batch.tokens, task.prompts("train", 300, 8).tokens)
    assert not np.array_equal(batch.tokens, task.prompts("eval", 300, 7).tokens)
    assert batch.tokens.shape == batch.mask.shape == (300, task.prompt_length)
    assert batch.tokens.dtype == batch.mask.dtype == np.int32
    np.testing.assert_array_equal(batch.mask, batch.tokens != 0)
    assert np.all(np.diff(batch.mask, axis=1) >= 0), "left padding: pads only before real tokens"
    assert np.all(batch.mask[:, -1] == 1)
    assert batch.tokens.max() < task.vocab_size
    assert len(set(batch.mask.sum(1).tolist())) > 1, "prompt lengths vary"


@pytest.mark.parametrize("task", TASKS, ids=TASK_NAMES)
def test_corpus_layout(task):
    corpus = task.pretraining_corpus(2000, 3)
    again = task.pretraining_corpus(2000, 3)
    for first, second in zip(corpus, again):
        np.testing.assert_array_equal(first, second)
    tokens, attention, counted = corpus
    num, length = 2000, task.sequence_length
    assert tokens.shape == attention.shape == counted.shape == (num, length)
    assert tokens.dtype == attention.dtype == np.int32 and counted.dtype == np.float32
    prompt_length = task.prompt_length
    assert np.all(counted[:, :prompt_length] == 0)
    np.testing.assert_array_equal(attention[:, :prompt_length], tokens[:, :prompt_length] != 0)
    np.testing.assert_array_equal(attention[:, prompt_length:], counted[:, prompt_length:])
    lengths = _counted_lengths(counted)
    assert lengths.min() >= 1
    positions = np.arange(task.max_response_length)
    response = tokens[:, prompt_length:]
    # Counted tokens are contiguous from P; everything after them is 0.
    np.testing.assert_array_equal(counted[:, prompt_length:], positions < lengths[:, None])
    assert np.all(response[positions >= lengths[:, None]] == 0)
    last = response[np.arange(num), lengths - 1]
    ended = last == EOS_ID
    # A response ends with its first EOS, or runs to the limit without one.
    assert np.all(ended | (lengths == task.max_response_length))
    inner = positions < (lengths - 1)[:, None]
    assert np.all(response[inner] != EOS_ID)
    assert ended.mean() > 0.3 and (~ended).mean() > 0.02, "both endings occur"
    assert len(np.unique(lengths)) >= 4, "lengths vary"


@pytest.mark.parametrize("task", TASKS, ids=TASK_NAMES)
def test_reward_jittable_deterministic(task):
    """The task's reward is a RewardFn (params, Responses) that reads no params; any leading shape."""
    corpus = task.pretraining_corpus(64, 0)
    eager = task.reward(None, corpus)
    jitted = jax.jit(task.reward)(None, corpus)
    assert eager.shape == (64,) and eager.dtype == jnp.float32
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(task.reward(None, corpus), eager)
    grouped = task.reward(None, type(corpus)(*(x.reshape(8, 8, -1) for x in corpus)))
    np.testing.assert_allclose(grouped.reshape(-1), eager, rtol=1e-6, atol=1e-6)
    assert np.unique(np.asarray(eager)).size > 32


@pytest.mark.parametrize("task", TASKS, ids=TASK_NAMES)
def test_reward_ignores_tokens_after_eos_and_checks_shapes(task):
    corpus = task.pretraining_corpus(200, 1)
    after_eos = (corpus.response_mask == 0) & (np.arange(task.sequence_length) >= task.prompt_length)
    junk = 1 + np.arange(corpus.tokens.size).reshape(corpus.tokens.shape) % 7
    noisy = np.where(after_eos, junk, corpus.tokens)
    np.testing.assert_array_equal(task.reward(None, corpus._replace(tokens=noisy)), task.reward(None, corpus))
    with pytest.raises(ValueError, match="response_mask shape"):
        task.reward(None, corpus._replace(response_mask=corpus.response_mask[:, 1:]))
    too_long = np.zeros((2, task.sequence_length + 1), np.int32)
    with pytest.raises(ValueError, match="prompt_length"):
        task.reward(None, type(corpus)(too_long, too_long, too_long))


@pytest.mark.parametrize("task", TASKS, ids=TASK_NAMES)
def test_chain_samples_match_generative_logprob_first_token(task):
    """The sampler draws y_1 with the probabilities generative_logprob assigns to it."""
    prompt = task.prompts("eval", 1, 0)
    num = 20_000
    repeated = Prompts(np.repeat(prompt.tokens, num, 0), np.repeat(prompt.mask, num, 0))
    chain = toy.chain() if task.name == "toy_language" else synthetic.chain()
    first = sample_chain(chain, repeated, np.random.default_rng(11))[:, 0]
    frequency = np.bincount(first, minlength=task.vocab_size) / num
    candidates = np.concatenate(
        [np.repeat(prompt.tokens, task.vocab_size, 0), np.arange(task.vocab_size)[:, None]], axis=1
    )
    mask = np.zeros(candidates.shape, np.float32)
    mask[:, task.prompt_length] = 1.0
    exact = np.exp(np.asarray(task.generative_logprob(candidates, mask), np.float64))
    assert exact.sum() == pytest.approx(1.0, abs=1e-5)
    band = 5 * np.sqrt(exact * (1 - exact) / num) + 1 / num
    assert np.all(np.abs(frequency - exact) <= band)


# ----------------------------------------------------------------------------------------
# Toy language: enumerable, few ties, an interesting alignment target.


def _toy_reward_float64(prompt: np.ndarray, response: np.ndarray) -> float:
    """r(x, y) = Σ_t ρ^{t-1} u_x(y_t) + λ n(y), written out from the module docstring."""
    values = toy.token_values().astype(np.float64)
    real = [token for token in prompt if token != 0]
    u = sum(values[token] for token in real) / len(real)
    total, n = 0.0, 0
    for t, token in enumerate(response):
        if token == EOS_ID:
            break
        total += math.exp(-0.5) ** t * u[token]
        n += 1
    return total + 0.05 * n


@pytest.fixture(scope="module")
def toy_eval_enumeration():
    """Reward and exact process probability of every response of every eval-pool prompt."""
    pool = toy.prompt_pool("eval")
    responses = np.asarray(enumerate_responses(toy.VOCAB_SIZE, toy.MAX_RESPONSE_LENGTH).tokens)
    num_prompts, num_responses = len(pool.tokens), len(responses)
    rows = layout(
        Prompts(np.repeat(pool.tokens, num_responses, 0), np.repeat(pool.mask, num_responses, 0)),
        np.tile(responses, (num_prompts, 1)),
    )
    reward = np.asarray(jax.jit(toy.reward)(rows.tokens, rows.response_mask)).reshape(num_prompts, -1)
    logprob = jax.jit(toy.generative_logprob)(rows.tokens, rows.response_mask)
    prob = np.exp(np.asarray(logprob, np.float64)).reshape(num_prompts, -1)
    return pool, responses, reward, prob


def test_data_is_pinned():
    """The tasks are fixed objects: a change of generator stream or table would show here."""
    np.testing.assert_array_equal(
        toy.prompt_pool("eval").tokens,
        [[0, 1], [0, 3], [1, 2], [2, 4], [3, 1], [3, 2], [4, 1], [4, 3],
         [4, 5], [5, 7], [6, 5], [7, 3], [7, 4], [7, 6], [7, 7], [8, 8]],
    )  # fmt: skip
    np.testing.assert_array_equal(
        synthetic.prompts("eval", 2, 0).tokens,
        [[0, 0, 111, 115, 83, 45, 73, 9], [59, 127, 14, 61, 115, 82, 51, 62]],
    )
    assert float(toy.token_values()[3, 5]) == pytest.approx(0.3417026, abs=1e-6)
    assert float(synthetic.gold_tables().bigram_bonus.sum()) == pytest.approx(-63.627857, abs=1e-3)


def test_toy_pools_and_prompt_stream():
    train, evaluation = toy.prompt_pool("train"), toy.prompt_pool("eval")
    as_set = lambda pool: {tuple(row) for row in pool.tokens.tolist()}
    assert len(as_set(train)) == 56 and len(as_set(evaluation)) == 16
    assert not as_set(train) & as_set(evaluation)
    assert len(as_set(train) | as_set(evaluation)) == 8 + 64
    drawn = toy.prompts("eval", 3 * 16, 5)
    counts = collections.Counter(tuple(row) for row in drawn.tokens.tolist())
    assert set(counts) == as_set(evaluation) and set(counts.values()) == {3}


def test_toy_response_space_is_enumerable():
    space = enumerate_responses(toy.VOCAB_SIZE, toy.MAX_RESPONSE_LENGTH)
    assert space.size == sum(8**k for k in range(5)) + 8**5 == 37_449
    # The corpus layout and the enumeration agree on which tokens count.
    prompt = toy.prompts("eval", 1, 0)
    repeated = Prompts(np.repeat(prompt.tokens, 100, 0), np.repeat(prompt.mask, 100, 0))
    rows = layout(repeated, np.asarray(space.tokens[:100]))
    np.testing.assert_array_equal(rows.response_mask[:, toy.PROMPT_LENGTH :], space.response_mask[:100])


def test_toy_reward_matches_formula():
    corpus = toy.pretraining_corpus(40, 2)
    got = np.asarray(toy.reward(corpus.tokens, corpus.response_mask))
    want = [_toy_reward_float64(row[:2], row[2:]) for row in corpus.tokens]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # A hand-built case: x = (3,), y = (5, 1, EOS).
    values = toy.token_values().astype(np.float64)
    by_hand = values[3, 5] + math.exp(-0.5) * values[3, 1] + 2 * 0.05
    row = np.array([[0, 3, 5, 1, 0, 0, 0]], np.int32)
    mask = np.array([[0, 0, 1, 1, 1, 0, 0]], np.float32)
    assert float(toy.reward(row, mask)[0]) == pytest.approx(by_hand, abs=1e-5)


def test_toy_process_normalized_and_few_ties(toy_eval_enumeration):
    pool, responses, reward, prob = toy_eval_enumeration
    np.testing.assert_allclose(prob.sum(1), 1.0, atol=1e-4)
    for prompt, values in zip(pool.tokens, reward):
        _, counts = np.unique(values, return_counts=True)
        tied_fraction = counts[counts > 1].sum() / values.size
        assert tied_fraction < 0.01, f"prompt {prompt}: {tied_fraction:.4f} of float32 rewards tied"
    # In exact arithmetic (float64 here) no two responses of a prompt tie.
    values64 = toy.token_values().astype(np.float64)
    content = np.cumprod(responses != EOS_ID, axis=1)  # 1 before the first EOS
    discount = math.exp(-0.5) ** np.arange(5)
    for prompt, mask in zip(pool.tokens, pool.mask):
        u = values64[prompt[mask > 0]].mean(0)
        exact = (content * (discount * u[responses] + 0.05)).sum(1)
        assert np.unique(exact).size == exact.size
        np.testing.assert_allclose(exact[::997], [_toy_reward_float64(prompt, y) for y in responses[::997]])


def test_toy_chain_samples_match_enumeration(toy_eval_enumeration):
    """Whole responses drawn by the sampler follow the enumerated process probabilities."""
    pool, responses, _, prob = toy_eval_enumeration
    num = 20_000
    prompt = Prompts(np.repeat(pool.tokens[:1], num, 0), np.repeat(pool.mask[:1], num, 0))
    drawn = sample_chain(toy.chain(), prompt, np.random.default_rng(3))
    exact = prob[0]
    lengths = counted_response_mask(responses).sum(1).astype(int)
    drawn_lengths = counted_response_mask(drawn).sum(1).astype(int)
    ended = responses[np.arange(len(responses)), lengths - 1] == EOS_ID
    drawn_ended = drawn[np.arange(num), drawn_lengths - 1] == EOS_ID
    # Categories: the first two tokens, and (length, ended with EOS).
    for keys, drawn_keys in [
        (responses[:, 0] * 9 + responses[:, 1], drawn[:, 0] * 9 + drawn[:, 1]),
        (lengths * 2 + ended, drawn_lengths * 2 + drawn_ended),
    ]:
        p = np.bincount(keys, weights=exact, minlength=keys.max() + 1)
        frequency = np.bincount(drawn_keys, minlength=len(p))[: len(p)] / num
        assert np.all(np.abs(frequency - p) <= 5 * np.sqrt(p * (1 - p) / num) + 1 / num)


def test_toy_reward_is_an_interesting_alignment_target(toy_eval_enumeration):
    """The reference process is far from reward-optimal but covers high-reward responses."""
    _, _, reward, prob = toy_eval_enumeration
    for values, p in zip(reward, prob):
        mode = np.argmax(p)
        assert np.argmax(values) != mode
        # At least 20% of the process's mass scores at least as high as its mode.
        assert p[values >= values[mode]].sum() > 0.2
        # The top 1% of responses by reward hold a moderate share of the mass.
        top = np.argsort(-values)[: values.size // 100]
        assert 1e-4 < p[top].sum() < 0.5
        # Exact best-of-16 (ALGORITHMS.md §1: P(pick tie class) = p_le^N − p_lt^N) gains
        # more than one reference standard deviation of reward.
        order = np.argsort(values)
        p_le = np.cumsum(p[order])
        p_lt = p_le - p[order]
        best_of_16 = ((p_le**16 - p_lt**16) * values[order]).sum()
        mean = (p * values).sum()
        std = np.sqrt((p * (values - mean) ** 2).sum())
        assert best_of_16 - mean > std


# ----------------------------------------------------------------------------------------
# Synthetic language: gold reward and Bradley–Terry preferences.


def _gold_float64(prompt: np.ndarray, response: np.ndarray) -> float:
    """r*(x, y) written out from the module docstring."""
    gold = synthetic.gold_tables()
    real = [token for token in prompt if token != 0]
    relevance = sum(gold.relevance[token].astype(np.float64) for token in real) / len(real)
    w = gold.token_value.astype(np.float64) + relevance
    content = []
    for token in response:
        if token == EOS_ID:
            break
        content.append(int(token))
    counts = collections.Counter(content)
    distinct = sum(w[token] for token in counts)
    bigrams = sum(float(gold.bigram_bonus[a, b]) for a, b in zip(content, content[1:]))
    repeats = sum(count - 1 for count in counts.values())
    return distinct + bigrams - 0.5 * repeats


def test_gold_reward_matches_formula():
    corpus = synthetic.pretraining_corpus(30, 4)
    tokens, mask = corpus.tokens.copy(), corpus.response_mask.copy()
    # Row 0: a response that repeats one token, to exercise the repetition cost.
    tokens[0, 8:] = 0
    tokens[0, 8:13] = [17, 17, 17, 40, 17]
    mask[0, 8:] = 0
    mask[0, 8:14] = 1  # four content tokens ... and the EOS at index 13
    got = np.asarray(synthetic.gold_reward(tokens, mask))
    want = [_gold_float64(row[:8], row[8:]) for row in tokens]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_preference_pairs_are_bradley_terry():
    corpus = synthetic.pretraining_corpus(400, 5)
    gold = np.asarray(synthetic.gold_reward(corpus.tokens, corpus.response_mask), np.float64)
    a, b = corpus.tokens[:200], corpus.tokens[200:]
    mask_a, mask_b = corpus.response_mask[:200], corpus.response_mask[200:]
    label = jax.jit(synthetic.preference_pairs)
    out = label(a, mask_a, b, mask_b, jax.random.key(0), 0.5)
    expected = 1 / (1 + np.exp(-(gold[:200] - gold[200:]) / 0.5))
    np.testing.assert_allclose(out.prob_a_preferred, expected, rtol=1e-4, atol=1e-5)
    swapped = label(b, mask_b, a, mask_a, jax.random.key(0), 0.5)
    np.testing.assert_allclose(out.prob_a_preferred + swapped.prob_a_preferred, 1.0, atol=1e-5)
    assert out.a_preferred.dtype == jnp.bool_ and out.a_preferred.shape == (200,)
    # One pair repeated: the label frequency is its Bradley–Terry probability.
    pair = int(np.argmin(np.abs(expected - 0.7)))
    num = 8_000
    repeat = lambda x: np.repeat(x[pair : pair + 1], num, 0)
    many = label(repeat(a), repeat(mask_a), repeat(b), repeat(mask_b), jax.random.key(1), 0.5)
    p = expected[pair]
    assert abs(float(many.a_preferred.mean()) - p) <= 5 * math.sqrt(p * (1 - p) / num)
    with pytest.raises(ValueError, match="tokens_a"):
        synthetic.preference_pairs(a, mask_a, b[:, 1:], mask_b[:, 1:], jax.random.key(0))


def test_preference_corpus_labels_follow_gold():
    data = synthetic.preference_corpus(1500, 0, temperature=1.0)
    again = synthetic.preference_corpus(1500, 0, temperature=1.0)
    np.testing.assert_array_equal(data.chosen.tokens, again.chosen.tokens)
    np.testing.assert_array_equal(data.chosen.tokens[:, :8], data.rejected.tokens[:, :8])
    gold = lambda rows: np.asarray(synthetic.gold_reward(rows.tokens, rows.response_mask), np.float64)
    chosen, rejected = gold(data.chosen), gold(data.rejected)
    # P(the chosen one has the higher gold reward) = σ(|Δ|), ties counting ½.
    agree = (chosen > rejected) + 0.5 * (chosen == rejected)
    p = 1 / (1 + np.exp(-np.abs(chosen - rejected)))
    assert abs(agree.mean() - p.mean()) <= 5 * math.sqrt((p * (1 - p)).sum()) / len(p)
    assert 0.6 < agree.mean() < 0.95, "labels are informative but noisy"


def test_synthetic_prompt_lengths_uniform():
    lengths = synthetic.prompts("train", 5000, 0).mask.sum(1)
    frequency = np.bincount(lengths, minlength=9)[4:] / 5000
    assert np.all(np.abs(frequency - 0.2) <= 5 * math.sqrt(0.2 * 0.8 / 5000))


# ----------------------------------------------------------------------------------------
# TFDS prompt sets and the resumable stream.


@pytest.fixture(scope="module")
def toy_data_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    prompt_sets.load_prompts("toy_language", "train", data_dir)
    return data_dir


@pytest.mark.parametrize("split", ["train", "eval"])
def test_tfds_round_trip_without_tensorflow(toy_data_dir, split, monkeypatch):
    def no_rebuild(self, split):
        raise AssertionError("the dataset was generated again")

    monkeypatch.setattr(prompt_sets.TaskPrompts, "_generate_examples", no_rebuild)
    before = {path: os.stat(path).st_mtime_ns for path in toy_data_dir.rglob("*.array_record*")}
    source = prompt_sets.load_prompts("toy_language", split, toy_data_dir)
    after = {path: os.stat(path).st_mtime_ns for path in toy_data_dir.rglob("*.array_record*")}
    assert before == after and len(before) == 2
    config = prompt_sets.TaskPrompts.builder_configs["toy_language"]
    num = config.num_train if split == "train" else config.num_eval
    expected = toy.prompts(split, num, config.seed)
    assert len(source) == num
    got = prompt_sets.read_prompt_rows(source, range(num))
    assert got.tokens.dtype == got.mask.dtype == np.int32
    np.testing.assert_array_equal(got.tokens, expected.tokens)
    np.testing.assert_array_equal(got.mask, expected.mask)
    assert "tensorflow" not in sys.modules


def test_prompt_stream_resumes(toy_data_dir):
    source = prompt_sets.load_prompts("toy_language", "eval", toy_data_dir)  # 16 rows
    everything = prompt_sets.read_prompt_rows(source, range(16)).tokens
    batches = [prompt_sets.read_prompt_rows(source, prompt_sets.batch_rows(step, 5, len(source))) for step in range(7)]
    # Step 3 reads stream positions 15 .. 19, which wrap around the 16 rows: rows 15, 0, 1, 2, 3.
    np.testing.assert_array_equal(batches[3].tokens, everything[[15, 0, 1, 2, 3]])
    np.testing.assert_array_equal(np.concatenate([b.tokens for b in batches]), everything[np.arange(35) % 16])
    with pytest.raises(ValueError, match="step"):
        prompt_sets.batch_rows(-1, 4, 16)


def test_synthetic_builder_features():
    builder = prompt_sets.prompt_builder("synthetic_language", "/nonexistent-data-dir")
    features = builder.info.features
    assert features["prompt"].shape == (8,) and features["prompt_mask"].shape == (8,)
    assert features["prompt"].np_dtype == np.int32
    with pytest.raises(ValueError, match="task="):
        prompt_sets.prompt_builder("imdb", "/nonexistent-data-dir")
