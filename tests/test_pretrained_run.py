"""Pretrained checkpoints in the runner: preference math, config checks, J-BOND / WIND runs that resume.

The config checks read small checkpoint-like folders made here (config.json + a BPE tokenizer);
the runs use the `tiny` variants of configs/pretrained/, i.e. the tiny Llama checkpoint and
reward model of tests/fixtures/pretrained, through `bond.train.run`.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond import train
from bond.config_base import load_config, set_field
from bond.context import make_setup
from bond.step import compute_params, init_state
from bond.metrics import read_metrics
from bond.models.preference import (
    Responses,
    borda_scores,
    joint_pair_inputs,
    pair_scorer_judge,
    preference_matrix,
    reward_judge,
    symmetric_preference,
)
from bond.validation import ConfigError, validate
from test_tokenizer import make_bpe_folder

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "pretrained"

# ---------------------------------------------------------------------------------------------
# Preference math


def _responses(tokens, attention, response):
    return Responses(*(jnp.asarray(x) for x in (tokens, attention, response)))


def test_reward_judge_is_bradley_terry_and_its_matrix_is_antisymmetric():
    scores = jnp.array([0.0, 1.0, -2.0])
    reward_fn = lambda params, responses: params[responses.tokens[:, 0]]  # row n scores its first token's entry
    tokens = jnp.array([[0, 5], [1, 5], [2, 5]], jnp.int32)
    ones = jnp.ones_like(tokens)
    a = _responses(tokens, ones, ones)
    b = _responses(tokens[::-1], ones, ones)
    p = reward_judge(reward_fn)(scores, a, b)
    np.testing.assert_allclose(p, jax.nn.sigmoid(jnp.array([0.0 - (-2.0), 0.0, -2.0 - 0.0])), rtol=1e-6)
    matrix = preference_matrix(reward_judge(reward_fn), scores, _responses(tokens[None], ones[None], ones[None]))[0]
    expected = 1.0 / (1.0 + np.exp(-(np.array(scores)[:, None] - np.array(scores)[None, :])))
    np.testing.assert_allclose(matrix, expected, rtol=1e-6)
    np.testing.assert_allclose(matrix + matrix.T, np.ones((3, 3)), atol=1e-6)


def test_pair_scorer_is_symmetrised_over_both_orders():
    # A position-biased scorer: s(x, y, y') = f(y) − f(y') + c, with f = the response's first token
    # and bias c towards the first response. Hand computation: P(y ≻ y') = ½[σ(d + c) + 1 − σ(−d + c)]
    # = ½[σ(d + c) + σ(d − c)] with d = f(y) − f(y').
    prompt_length, c = 2, 0.7

    def logit(params, joint):
        del params
        tokens = joint.tokens
        f_first = tokens[:, prompt_length].astype(jnp.float32)  # y's first token
        f_second = tokens[:, -2].astype(jnp.float32)  # y''s first token (response length 2, no separator)
        return f_first - f_second + c

    judge = pair_scorer_judge(logit, prompt_length)
    tokens = jnp.array([[[9, 9, 1, 0], [9, 9, 3, 0], [9, 9, 2, 0]]], jnp.int32)  # one prompt, S = 3, L = 2
    attention = jnp.array([[[1, 1, 1, 0]] * 3], jnp.int32)
    response = jnp.array([[[0, 0, 1, 0]] * 3], jnp.float32)
    matrix = np.asarray(preference_matrix(judge, None, _responses(tokens, attention, response))[0])
    f = np.array([1.0, 3.0, 2.0])
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))
    d = f[:, None] - f[None, :]
    np.testing.assert_allclose(matrix, 0.5 * (sig(d + c) + sig(d - c)), rtol=1e-6)
    np.testing.assert_allclose(np.diag(matrix), 0.5, atol=1e-7)
    np.testing.assert_allclose(matrix + matrix.T, 1.0, atol=1e-6)
    a = _responses(tokens[0, :1], attention[0, :1], response[0, :1])
    b = _responses(tokens[0, 1:2], attention[0, 1:2], response[0, 1:2])
    np.testing.assert_allclose(symmetric_preference(judge, None, a, b), matrix[0, 1], rtol=1e-6)
    # Borda: mean win probability against the other two samples
    np.testing.assert_allclose(borda_scores(matrix[None])[0], (matrix.sum(1) - 0.5) / 2, rtol=1e-6)


def test_joint_pair_inputs_layout():
    # P = 2 (left-padded prompt [pad, 7]), responses of length 3: a = [4, EOS=2, pad], b = [5, 6, 2]
    a = _responses([[0, 7, 4, 2, 0]], [[0, 1, 1, 1, 0]], [[0, 0, 1, 1, 0]])
    b = _responses([[0, 7, 5, 6, 2]], [[0, 1, 1, 1, 1]], [[0, 0, 1, 1, 1]])
    joint = joint_pair_inputs(a, b, prompt_length=2, separator=[11, 12])
    assert joint.tokens.tolist() == [[0, 7, 4, 2, 0, 11, 12, 5, 6, 2]]
    assert joint.attention_mask.tolist() == [[0, 1, 1, 1, 0, 1, 1, 1, 1, 1]]
    assert joint.response_mask.tolist() == [[0, 0, 1, 1, 0, 1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="same shape"):
        joint_pair_inputs(a, _responses(*(np.asarray(x)[:, :4] for x in b)), prompt_length=2)


# ---------------------------------------------------------------------------------------------
# Checkpoint-like folders for the config checks (config.json + a BPE tokenizer; no weights are read)


def _checkpoint_folder(folder: Path, vocab_size: int = 320, max_positions: int = 64, tokenizer: bool = True) -> Path:
    if tokenizer:
        make_bpe_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(
        {"vocab_size": vocab_size, "max_position_embeddings": max_positions, "eos_token_id": 2}
    ))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"q": f"question number {i}: the quick brown fox?"}) for i in range(12)))
    return {
        "policy": _checkpoint_folder(root / "policy"),
        "reward": _checkpoint_folder(root / "reward"),
        "prompts": prompts,
        "root": root,
    }


def _config(folders, algorithm="j_bond", **pretrained):
    c = load_config(str(ROOT / "configs/pretrained/j_bond_gemma.py") + ":tiny")
    c.algorithm = algorithm
    fields = dict(policy_path=str(folders["policy"]), reward_path=str(folders["reward"]), max_prompt_length=12,
                  max_new_tokens=6)
    c.pretrained.update({**fields, **pretrained})
    c.pretrained.prompts.update(source=f"jsonl:{folders['prompts']}", field="q")
    return c


# ---------------------------------------------------------------------------------------------
# Config checks: each bad field is named


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda c, f: c.pretrained.update(policy_path=""), "config.pretrained.policy_path is empty"),
        (lambda c, f: c.pretrained.update(policy_path=str(f["root"] / "nope")), "config.pretrained.policy_path="),
        (lambda c, f: c.pretrained.update(tokenizer_path=str(f["root"])), "config.pretrained.tokenizer_path"),
        (lambda c, f: c.pretrained.update(reward_path=""), "config.pretrained.reward_path is empty"),
        (lambda c, f: c.pretrained.update(preference_path=str(f["reward"])), "config.pretrained.preference_path is set"),
        (lambda c, f: c.pretrained.update(param_dtype="int8"), "config.pretrained.param_dtype"),
        (lambda c, f: c.pretrained.update(max_new_tokens=60), "max_position_embeddings"),
        (lambda c, f: c.pretrained.update(max_prompt_length=0), "config.pretrained.max_prompt_length"),
        (lambda c, f: c.pretrained.prompts.update(source="xsum"), "config.pretrained.prompts.source"),
        (lambda c, f: c.pretrained.prompts.update(source=f"jsonl:{f['root']}/none.jsonl"), "no jsonl file"),
        (lambda c, f: c.pretrained.prompts.update(template="{document}"), "config.pretrained.prompts.template"),
        (lambda c, f: c.pretrained.update(eos_token="<nope>"), "not in the tokenizer's vocabulary"),
        (lambda c, f: setattr(c, "task", "pretrained_typo"), "config.task"),
    ],
)
def test_bad_pretrained_fields_name_the_field(folders, change, field):
    c = _config(folders)
    change(c, folders)
    with pytest.raises(ConfigError, match=field.replace("(", r"\(").replace("[", r"\[")):
        validate(c)


def test_vocabulary_and_chat_template_mismatches(folders):
    root = folders["root"]
    small = _checkpoint_folder(root / "small_vocab", vocab_size=100, tokenizer=False)
    with pytest.raises(ConfigError, match=r"tokenizer of config.pretrained.tokenizer_path has \d+ tokens"):
        validate(_config(folders, policy_path=str(small), tokenizer_path=str(folders["policy"])))
    with pytest.raises(ConfigError, match=r"config.pretrained.reward_path=.* embeds 100 tokens"):
        validate(_config(folders, reward_path=str(small)))
    other = _checkpoint_folder(root / "other_tokenizer")  # the same tokenizer with the ids of two tokens swapped
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    first, second = by_id[300 - 1], by_id[300 - 2]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="config.pretrained.reward_path=.*tokenizer that differs"):
        validate(_config(folders, reward_path=str(other)))
    no_template = _checkpoint_folder(root / "no_template")
    (no_template / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ConfigError, match="config.pretrained.chat_template=True"):
        validate(_config(folders, policy_path=str(no_template), chat_template=True))


# ---------------------------------------------------------------------------------------------
# Runs on the tiny checkpoints of tests/fixtures/pretrained (tests/make_pretrained_fixtures.py)


def _tiny(name: str, **changes):
    config = load_config(str(ROOT / "configs/pretrained" / name) + ":tiny")
    for key, value in changes.items():
        set_field(config, key, value)
    return config


def test_checkpoint_setup_bfloat16_model_keeps_float32_master_weights_and_optimizer_state():
    setup, params = make_setup(_tiny("j_bond_gemma.py", **{"pretrained.param_dtype": "bfloat16"}), log=lambda s: None)
    state = init_state(setup, params)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(compute_params(setup, state.params))} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state)} <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}
    hf = json.loads((FIXTURES / "llama" / "config.json").read_text())
    tokenizer_config = json.loads((FIXTURES / "llama" / "tokenizer_config.json").read_text())
    assert setup.task.vocab_size == hf["vocab_size"] and setup.task.prompt_length == 32
    assert setup.judge_params["reward"] is not None and setup.preference_judge is None
    assert tokenizer_config["eos_token"] == "<|end_of_text|>" and setup.task.eos_id == hf["eos_token_id"]


def test_j_bond_on_the_llama_fixture_writes_metrics_and_resumes(tmp_path):
    config = _tiny("j_bond_gemma.py", steps=2)
    train.run(config, tmp_path, log=lambda s: None)
    logs = []
    summary = train.run(config, tmp_path, log=logs.append)  # the same command again: resumes at its last step
    assert any("Resumed from the checkpoint at step 2" in line for line in logs)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    trained = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in trained] == [1, 2]
    assert all(np.isfinite(r["train/loss"]) for r in trained)
    for key in ("eval/reward", "eval/kl_policy_ref", "eval/win_rate_vs_ref"):
        assert np.isfinite(summary["after"][key]), key
    assert summary["task"] == "pretrained" and (tmp_path / "summary.json").exists()


def test_wind_learns_from_the_pair_scorer(tmp_path):
    # bfloat16 parameters (float32 Adam state), as the paper-scale configs run
    summary = train.run(_tiny("wind_llama.py", steps=1, **{"pretrained.param_dtype": "bfloat16"}), tmp_path,
                        log=lambda s: None)
    trained = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert len(trained) == 1 and np.isfinite(trained[0]["train/loss"])
    assert 0.0 < trained[0]["train/preference_decidedness"] <= 0.5
    assert 0.0 <= summary["after"]["eval/preference_win_rate_vs_ref"] <= 1.0


def test_seeds_only_sweep_of_a_pretrained_config_runs_as_a_population_matching_separate_runs(tmp_path):
    """A sweep over seeds of configs/pretrained/j_bond_gemma.py:tiny goes to population mode (every
    varied field is traced) and each member ends where its own `train.run` does."""
    from bond import population, sweep

    configs = [_tiny("j_bond_gemma.py", seed=seed, steps=2, num_devices=1) for seed in (0, 1)]
    assert sweep.choose_mode("auto", configs) == "population"
    results = population.run_population(configs, [tmp_path / f"member{s}" for s in (0, 1)], log=lambda s: None)
    for seed, config, member in zip((0, 1), configs, results):
        separate = train.run(config, tmp_path / f"separate{seed}", log=lambda s: None)
        member_rows = read_metrics(tmp_path / f"member{seed}" / "metrics.jsonl")
        separate_rows = read_metrics(tmp_path / f"separate{seed}" / "metrics.jsonl")
        assert [r["step"] for r in member_rows] == [r["step"] for r in separate_rows]
        for got, want in zip(member_rows, separate_rows):
            assert sorted(got) == sorted(want)
            for key in want:  # float32: the population's vmapped matmuls round differently (~1e-6 relative)
                np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=f"seed {seed} {key}")
        assert member["after"] == pytest.approx(separate["after"], rel=1e-5, abs=1e-5)
    # The seeds differ, so the members must too: the comparison above is not of one run with itself.
    assert results[0]["after"]["eval/reward"] != results[1]["after"]["eval/reward"]
