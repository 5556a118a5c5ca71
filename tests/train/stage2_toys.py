"""The toy stage-2 pieces the stage-2 step tests share (discriminator_test.py, fidelity_fields_test.py): the step's
wiring does not depend on what G and D are, so cheap toy modules stand in for the U-Nets; the text encoder is the
real (tiny) one."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny as tiny_config
from d2g_jax.train.generator import Generator
from d2g_jax.train.optim import optimizer_from_config
from d2g_jax.train.state import TrainState


class ToyGenerator(Generator):
    """x0 = a·z + (mean_tokens(context) @ w): depends on its params, the noise and the text."""

    def __call__(self, params, z, cond):
        text = jnp.mean(cond["context"], axis=1) @ params["w"]
        return params["a"] * z + text[:, None, None, :]


class ToyDisc(nn.Module):
    """Two logit maps (full and half resolution) from x, z, the timestep and the text."""

    @nn.compact
    def __call__(self, x, z, timesteps, context, text_embeds=None, time_ids=None):
        h = nn.Conv(8, (3, 3))(x) + nn.Dense(8)(z) + nn.Dense(8)(jnp.mean(context, axis=1))[:, None, None, :]
        h = nn.silu(h + 1e-3 * timesteps.astype(jnp.float32)[:, None, None, None])
        return nn.Dense(1)(h), nn.Dense(1)(nn.avg_pool(h, (2, 2), (2, 2)))


def stage2_config():
    """configs/tiny.py for one stage-2 step of batch 4: MSE, mix-and-match on half the fakes, R1 on one sample."""
    config = tiny_config.get_config()
    config.loss.kind = "mse"
    config.stage2.batch_size = 4
    config.disc.mix_match_fraction = 0.5
    config.disc.mix_match_types = "noise,text"
    for group in (config.stage2, config.disc):  # large learning rates: every parameter with a gradient moves
        group.lr = group.lr_end = 1e-2
    for group in (config.train, config.disc):  # no weight decay: a parameter moves iff it has a gradient
        group.weight_decay = group.weight_decay_attention = 0.0
        group.lr_schedule = "constant"
    assert float(config.disc.r1_gamma) > 0 and int(config.disc.r1_samples) == 1
    return config


def make_state(gp, dp, t, dc):
    """`(TrainState at step 0, (tx, lr_fn, dtx, dlr_fn))` for G params `gp` and D params `dp`."""
    tx, lr_fn = optimizer_from_config(gp, t, int(t.num_steps))
    dtx, dlr_fn = optimizer_from_config(dp, dc, int(t.num_steps))
    state = TrainState(step=jnp.int32(0), params=gp, ema=gp, opt_state=tx.init(gp), rng=jax.random.PRNGKey(0),
                       disc=dp, disc_opt=dtx.init(dp))  # fmt: skip
    return state, (tx, lr_fn, dtx, dlr_fn)


def make_batch(text, b, seed=4):
    """A stage-2 batch of `b` ≤ 4 rows: random 8×8×4 noise and latents, tokenised captions."""
    rng = np.random.default_rng(seed)
    tok = text.tokenize(["a red cube", "two birds", "a small house", "the sea at night"][:b])
    return {"noise": jnp.asarray(rng.standard_normal((b, 8, 8, 4)), jnp.float32),
            "latent": jnp.asarray(rng.standard_normal((b, 8, 8, 4)), jnp.float32),
            "ids": tuple(jnp.asarray(i) for i in tok.ids),
            "masks": tuple(jnp.asarray(m) for m in tok.masks)}  # fmt: skip
