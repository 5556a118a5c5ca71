"""The MNIST world's long recipe: configs/mnist.py with 16× its pairs and 10× its stage-1 steps, sized from the
Table 6 analogue (FIDELITY.md, "Pairs and steps"): ~1.6 h on the fast 2-core machine of BENCHMARKS.md, an
estimated 4-4.5 h on the slow end of the machines measured.

    python -m d2g_jax.main --config=configs/mnist_long.py --workdir=/tmp/d2g_mnist_long

Same world, teacher, loss, batch and learning rates as configs/mnist.py; only the budget differs:

* pairs: 49,152 teacher ODE pairs (48 shards of 1,024), the first 4,096 of which are configs/mnist.py's set;
* stage 1: 10,000 steps at batch 64 (640k samples, ~13 epochs of the pairs), lr 5e-4 → 1e-5 cosine;
* stage 2: 500 steps of the full conditional GAN (configs/mnist.py's D);
* the paper's metrics of the EMA generator on all 500 held-out captions every 2,500 steps
  (`<workdir>/eval/*.json`), so the run itself draws its steps curve.

The run measured in BENCHMARKS.md (2026-12-05) pulled G's two stage-2 gradient parts back apart
(`stage2.log_grad_parts=True`, the default then); it inherits configs/mnist.py's False now: the same update up to
float rounding, its stage 2 ~0.73× the time per step.

Resumable: every phase continues from its last checkpoint / shard when the same command is run again (a machine
that cannot give it one sitting runs it in several). Phase times on the machines measured: BENCHMARKS.md.
"""

from configs import mnist


def get_config():
    c = mnist.get_config()
    c.pairs.num_pairs = 49_152  # the Table 6 analogue's largest set
    c.train.num_steps = 10_000
    c.train.ckpt_every = 500  # resume points (a ~3 s save on 2 cores)
    c.train.log_every = 100
    c.stage2.num_steps = 500  # Table 2 at 500 steps (FIDELITY.md): the budget where D has learned
    c.stage2.ckpt_every = 250
    c.stage2.eval_every = 250  # D's held-out accuracy (eval/d_acc) twice
    c.stage2.sample_every = 250
    c.train.eval_every = 2500
    c.train.sample_every = 2500
    c.eval.every = 2500  # the paper's metrics of the EMA on the 500 held-out captions: the run's steps curve
    c.eval.subset = 500
    return c
