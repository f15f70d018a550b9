"""Runner stages that alignment runs share: reference pretraining (SFT) and proxy reward models.

Each stage is cached under `<cache_dir>/<stage>/<task>-<hash>`, the hash covering everything
that defines its result (task, architecture, the stage's config); the first run builds it,
later runs load it. A stage's folder appears only once complete (written to a temporary
folder, then renamed), so an interrupted build is rebuilt, never half-loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from bond import sharding
from bond.models import (
    TransformerConfig,
    bradley_terry_loss,
    init_params,
    init_reward_params,
    reward_model_scores,
    sequence_logprobs,
)
from bond.tasks import SyntheticTask, Task


def cache_root(cache_dir: str = "") -> Path:
    """The stage cache: `cache_dir`, else $BOND_CACHE, else ~/.cache/bond."""
    return Path(cache_dir or os.environ.get("BOND_CACHE") or Path.home() / ".cache" / "bond")


def model_config(config: ml_collections.ConfigDict, task: Task) -> TransformerConfig:
    """The policy/reference architecture of `config.model`, sized for the task's vocabulary and lengths."""
    m = config.model
    return TransformerConfig(
        vocab_size=task.vocab_size,
        num_layers=m.num_layers,
        d_model=m.d_model,
        num_heads=m.num_heads,
        d_ff=m.d_ff,
        max_len=task.sequence_length,
        dtype=jnp.dtype(m.dtype),
    )


def model_spec(model: TransformerConfig) -> dict:
    """The fields of `model` that differ from TransformerConfig's defaults (the required ones always):
    the part of a stage's cache key that names the architecture, stable when new fields with
    defaults are added to TransformerConfig."""
    spec = {}
    for field in dataclasses.fields(model):
        value = getattr(model, field.name)
        if field.default is dataclasses.MISSING or value != field.default:
            spec[field.name] = value
    return spec


def _stage_dir(root: Path, stage: str, task: Task, spec: dict) -> Path:
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return root / stage / f"{task.name}-{digest}"


def _cached(path: Path, spec: dict, build: Callable[[], Any], abstract: Any) -> Any:
    """Loads the params at `path` onto the shapes of `abstract`, or builds, saves (atomically) and returns them.

    With several processes (jax.distributed) every process builds the same deterministic stage on
    its own first device, only process 0 writes it, and the others wait at a barrier and load
    process 0's copy, so that all hold identical parameters. This assumes `path` is on a file
    system all processes share. The parameters returned are local to this process (its first
    device), not arrays across processes.
    """
    if _on_process_zero_exists(path / "spec.json"):
        return _restore_local(path / "params", abstract)
    params = build()
    if jax.process_index() == 0:
        _save_local(path, spec, params)
    if jax.process_count() > 1:
        sharding.sync_processes(f"bond.stages:{path}")
        if jax.process_index() != 0:
            params = _restore_local(path / "params", abstract)
    return params


def _on_process_zero_exists(path: Path) -> bool:
    """Whether `path` exists as process 0 sees it, so that all processes take the same branch."""
    exists = path.exists()
    if jax.process_count() == 1:
        return exists
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(exists, np.int32)))


def _local_checkpointer() -> ocp.StandardCheckpointer:
    """An orbax checkpointer that involves only this process (no barriers with the others)."""
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.StandardCheckpointer(multiprocessing_options=options)


def _restore_local(path: Path, abstract: Any) -> Any:
    """The params saved at `path`, on this process's first device."""
    if jax.process_count() == 1:
        return ocp.StandardCheckpointer().restore(path, abstract)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    return _local_checkpointer().restore(path, target)


def _save_local(path: Path, spec: dict, params: Any) -> None:
    """Writes `params` and `spec.json` to a temporary folder, then renames it to `path` (unless it appeared)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        if jax.process_count() == 1:
            checkpointer = ocp.StandardCheckpointer()
        else:  # orbax refuses process-local jax.Arrays with several processes; host copies are the same values
            checkpointer, params = _local_checkpointer(), jax.device_get(params)
        checkpointer.save(tmp / "params", params)
        checkpointer.wait_until_finished()
        (tmp / "spec.json").write_text(json.dumps(spec, indent=1, sort_keys=True, default=str))
        if path.exists():  # built concurrently by another process: keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _adam_steps(loss_fn, params, batches, learning_rate: float, steps: int, log: Callable[[str], None], what: str):
    """Plain Adam with linear decay over `steps` minibatches from `batches(step)`; jitted step."""
    optimizer = optax.adam(optax.linear_schedule(learning_rate, learning_rate * 0.1, steps))
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, batches(i))
        if (i + 1) % max(steps // 5, 1) == 0 or i + 1 == steps:
            log(f"{what}: step {i + 1}/{steps}, loss {float(loss):.4f}")
    return params


def _minibatch(arrays: tuple[np.ndarray, ...], batch_size: int, seed: int) -> Callable[[int], tuple]:
    """Epoch-wise shuffled minibatches, a pure function of the step index."""
    num = arrays[0].shape[0]
    per_epoch = max(num // batch_size, 1)

    def batch(step: int):
        epoch, index = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(num)
        rows = order[index * batch_size : (index + 1) * batch_size]
        return tuple(a[rows] for a in arrays)

    return batch


def pretrained_reference(
    config: ml_collections.ConfigDict, task: SyntheticTask, log: Callable[[str], None] = print,
    abstract: bool = False,
) -> tuple[TransformerConfig, Any]:
    """The reference policy π_ref: the model of `config.model` fitted by maximum likelihood to
    the responses of the task's pretraining corpus (SFT), cached. Returns (model config, params);
    with `abstract`, the parameters' shapes and dtypes only (jax.ShapeDtypeStruct), nothing trained.

    Loss: −Σ_t log π(y_t | x, y_<t) over response tokens (EOS included) / number of such tokens.
    """
    model = model_config(config, task)
    r = config.reference
    spec = {"task": task.name, "model": model_spec(model), "reference": r.to_dict()}
    path = _stage_dir(cache_root(config.cache_dir), "reference", task, spec)

    def build():
        log(f"Pretraining the reference on {r.corpus_size} {task.name} sequences ({r.steps} steps) -> {path}")
        corpus = task.pretraining_corpus(r.corpus_size, r.seed)
        arrays = (corpus.tokens, corpus.attention_mask, corpus.response_mask)

        def loss_fn(params, batch):
            tokens, attention_mask, response_mask = batch
            token_lp, _ = sequence_logprobs(params, tokens, response_mask, model=model, attention_mask=attention_mask)
            return -jnp.sum(token_lp) / jnp.maximum(jnp.sum(response_mask), 1.0)

        params = init_params(model, jax.random.key(r.seed))
        return _adam_steps(loss_fn, params, _minibatch(arrays, r.batch_size, r.seed), r.learning_rate, r.steps, log,
                           "reference")

    shapes = jax.eval_shape(init_params, model, jax.random.key(r.seed))
    return model, shapes if abstract else _cached(path, spec, build, shapes)


def proxy_reward_model(
    config: ml_collections.ConfigDict, task: Task, preference_corpus: Callable, log: Callable[[str], None] = print,
    abstract: bool = False,
) -> tuple[TransformerConfig, Any]:
    """A learned proxy reward: a reward model (transformer trunk + scalar head) fitted with the
    Bradley–Terry loss −log σ(r(chosen) − r(rejected)) to gold-labelled preference pairs, cached.
    With `abstract`, its parameters' shapes and dtypes only, nothing trained.

    `preference_corpus(num, seed)` returns pairs with `.chosen` and `.rejected` Sequences.
    """
    model = model_config(config, task)
    rm = config.reward_model
    spec = {"task": task.name, "model": model_spec(model), "reward_model": rm.to_dict()}
    path = _stage_dir(cache_root(config.cache_dir), "reward_model", task, spec)

    def build():
        log(f"Training the proxy reward model on {rm.num_pairs} preference pairs ({rm.steps} steps) -> {path}")
        pairs = preference_corpus(rm.num_pairs, rm.seed)
        arrays = (pairs.chosen.tokens, pairs.chosen.attention_mask, pairs.rejected.tokens, pairs.rejected.attention_mask)

        def loss_fn(params, batch):
            ct, cm, rt, rmask = batch
            chosen = reward_model_scores(params, ct, cm, model=model)
            rejected = reward_model_scores(params, rt, rmask, model=model)
            return bradley_terry_loss(chosen, rejected)[0]

        params = init_reward_params(model, jax.random.key(rm.seed))
        return _adam_steps(loss_fn, params, _minibatch(arrays, rm.batch_size, rm.seed), rm.learning_rate, rm.steps,
                           log, "reward model")

    shapes = jax.eval_shape(init_reward_params, model, jax.random.key(rm.seed))
    return model, shapes if abstract else _cached(path, spec, build, shapes)
