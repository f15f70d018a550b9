"""One process of the multi-process training test (tests/test_distributed.py launches two).

Run as a script, it joins the other processes through `jax.distributed` (gloo collectives on
CPU; `bond.main.join_cluster`), builds one mesh over the devices of all processes, loads the
initial parameters (written by the test, as a checkpoint would be) and only its own rows of the
batch, trains a tiny model for a few Adam steps and writes the gathered results to an .npz file.
Imported, it provides the same problem and `train_one_device` for the single-process reference.

With --checkpoint_dir it resumes from the newest checkpoint there and saves one after every step
(all processes together, as `train.run` does); with --die_after_step K it kills itself (SIGKILL)
once the checkpoint of step K is complete, so that tests/test_faults.py can check that the other
process stops and that a rerun resumes.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/distributed_worker.py \\
        --process_id 0 --num_processes 2 --port 12345 --init /tmp/init.npz --out /tmp/process0.npz
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: import bond from this checkout, not from wherever it is installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

from bond import models, sharding
from bond.checkpoint import Checkpointer, abstract_like

CONFIG = models.TransformerConfig(vocab_size=16, num_layers=1, d_model=16, num_heads=4, d_ff=32, max_len=12)
GLOBAL_BATCH, PROMPT_LEN, LENGTH = 8, 3, 8
STEPS = 3
# fsdp across the two processes (parameters split between them, batch too), tensor inside each.
MESH_SHAPE = (1, 2, 2)
# eps well above the ~1e-9 rounding noise of gradients that are 0 in exact arithmetic (see
# tests/test_sharding.py): with eps = 1e-8 Adam would turn that noise into full-size steps.
OPTIMIZER = optax.adam(1e-2, eps=1e-4)
# Small programs compile about 2.5x faster on CPU at LLVM -O0; the arithmetic is the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def make_batch() -> dict[str, np.ndarray]:
    """The global batch (every process builds it; each loads only its own rows)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, CONFIG.vocab_size, size=(GLOBAL_BATCH, LENGTH)).astype(np.int32)
    response_mask = np.zeros(tokens.shape, np.float32)
    response_mask[:, PROMPT_LEN:] = 1.0
    return {"tokens": tokens, "response_mask": response_mask}


def row_logprobs(params, batch) -> jax.Array:
    return models.sequence_logprobs(params, batch["tokens"], batch["response_mask"], model=CONFIG)[1]


def train_step(params, opt_state, batch):
    """One Adam step on -mean log π(response); also returns the per-row log-probabilities."""

    def loss_and_rows(p):
        rows = row_logprobs(p, batch)
        return -jnp.mean(rows), rows

    (loss, rows), grads = jax.value_and_grad(loss_and_rows, has_aux=True)(params)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, rows


def train(step, params, opt_state, batch, first=1, after_step=None) -> tuple[object, np.ndarray, jax.Array]:
    """Steps first..STEPS: the final params, their losses, the per-row log-probabilities of the last step.

    after_step(t, params, opt_state), if given, runs after step t (before the next step donates them)."""
    losses = []
    for t in range(first, STEPS + 1):
        params, opt_state, loss, rows = step(params, opt_state, batch)
        losses.append(loss)
        if after_step is not None:
            after_step(t, params, opt_state)
    return params, np.asarray(losses), rows


def train_one_device(host_params):
    """The reference: the same training, unsharded, on the default device."""
    step = jax.jit(train_step, compiler_options=FAST_COMPILE)
    params, losses, rows = train(step, host_params, OPTIMIZER.init(host_params), make_batch())
    return jax.device_get(params), losses, np.asarray(rows)


def train_distributed(host_params, checkpoint_dir=None, die_after_step=None) -> tuple[object, np.ndarray, np.ndarray, int]:
    """The same training on a mesh over all processes; results gathered to every process, and the first step run.

    With `checkpoint_dir`: resumes from its newest readable checkpoint and saves every step; with
    `die_after_step` too, SIGKILLs this process once that step's checkpoint is complete."""
    from jax.experimental import multihost_utils

    mesh = sharding.make_mesh(MESH_SHAPE)
    sharding.check_batch_divides(GLOBAL_BATCH, mesh, field="GLOBAL_BATCH")
    param_sh = sharding.param_shardings(host_params, models.param_logical_axes(CONFIG), mesh)
    params = sharding.device_put_global(host_params, param_sh)
    opt_sh = sharding.shardings_like_params(jax.eval_shape(OPTIMIZER.init, params), params, param_sh, mesh)
    opt_state = jax.jit(OPTIMIZER.init, out_shardings=opt_sh)(params)

    batch_sh = sharding.batch_sharding(mesh)
    rows = sharding.local_batch_rows(batch_sh, GLOBAL_BATCH)
    local_batch = {name: value[rows] for name, value in make_batch().items()}
    batch = sharding.host_local_to_global(local_batch, batch_sh)

    step = sharding.jit_sharded(
        train_step,
        in_shardings=(param_sh, opt_sh, batch_sh),
        out_shardings=(param_sh, opt_sh, sharding.replicated(mesh), batch_sh),
        donate_argnums=(0, 1),
        compiler_options=FAST_COMPILE,
    )
    first, after_step = 1, None
    if checkpoint_dir is not None:
        checkpointer = Checkpointer(checkpoint_dir, keep=2)
        target = abstract_like({"params": params, "opt_state": opt_state}, {"params": param_sh, "opt_state": opt_sh})
        resumed = checkpointer.restore_latest(target)
        if resumed is not None:
            done, state, _ = resumed
            first, params, opt_state = done + 1, state["params"], state["opt_state"]

        def after_step(t, params, opt_state):
            checkpointer.save(t, {"params": params, "opt_state": opt_state})
            if t == die_after_step:
                checkpointer.wait_until_finished()
                os.kill(os.getpid(), signal.SIGKILL)

    params, losses, logprobs = train(step, params, opt_state, batch, first, after_step)
    if checkpoint_dir is not None:
        checkpointer.close()
    gathered_params, gathered_logprobs = multihost_utils.process_allgather((params, logprobs), tiled=True)
    return gathered_params, losses, np.asarray(gathered_logprobs), first


def random_params(seed: int = 0):
    """N(0, 0.1^2) parameters of CONFIG's shapes, drawn on the host (no init program to compile)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(models.init_params, CONFIG, jax.random.key(0))
    return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def save_params(path, params) -> None:
    np.savez(path, *jax.tree.leaves(jax.device_get(params)))


def load_params(path):
    """Parameters saved by `save_params`, in the tree structure of CONFIG's parameters."""
    is_spec = lambda x: isinstance(x, PartitionSpec)
    treedef = jax.tree.structure(models.param_logical_axes(CONFIG), is_leaf=is_spec)
    with np.load(path) as saved:
        return jax.tree.unflatten(treedef, [saved[f"arr_{i}"] for i in range(len(saved.files))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--init", required=True, help="initial parameters (save_params)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint_dir", help="resume from and save into this folder")
    parser.add_argument("--die_after_step", type=int, help="SIGKILL this process after that step's checkpoint")
    parser.add_argument("--heartbeat_timeout_s", type=int, default=100)
    args = parser.parse_args()

    from bond.main import exit_if_a_process_died, join_cluster

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    join_cluster(f"127.0.0.1:{args.port}", args.num_processes, args.process_id, args.heartbeat_timeout_s)
    try:
        params, losses, logprobs, first = train_distributed(load_params(args.init), args.checkpoint_dir, args.die_after_step)
    except Exception as e:  # as bond.main does
        exit_if_a_process_died(e)
        raise
    np.savez(
        args.out,
        num_devices=jax.device_count(),
        num_local_devices=jax.local_device_count(),
        first_step=first,
        losses=losses,
        logprobs=logprobs,
        **{f"param_{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(params))},
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
