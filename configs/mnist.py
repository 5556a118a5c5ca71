"""The whole job on the MNIST world (d2g_jax/world/): a Stable-Diffusion-format teacher trained by d2g_jax on real
MNIST digits with colour captions, distilled into a one-step generator, evaluated with the world's classifier.

    python -m d2g_jax.main --config=configs/mnist.py --workdir=/tmp/d2g_mnist

world (the shipped, verified assets; datasets written into the workdir) → teacher DDIM pairs → stage 1
(E-LatentLPIPS* with the world's LatentVGG) → stage 2 (+ the conditional GAN) → export → evaluation of the student,
the teacher's 50-step ODE, the teacher's one-step x0 and the real floor, printed as a table, with a grid of teacher
rows over student rows on the same noise (`<workdir>/report/`). Sized for ≤ 30 min on the slow end of the 2-core
machines measured (BENCHMARKS.md).
"""

from configs import base


def get_config():
    c = base.get_config()
    c.world.provider = "d2g_jax.world.mnist"  # fills teacher.path, loss.ckpt_dir, pairs/eval prompts, eval.real, …
    c.teacher.dtype = "float32"  # bf16 on this CPU is slower than fp32
    # The 2 cores as 2 JAX devices (bench/throughput.py, BENCHMARKS.md: pairs 1.49×, stage 1 1.08× of 1 device).
    c.cpu.host_devices = 2
    # Compiled programs kept in <workdir>/jax_cache: stage 2's held-out eval and grid reuse stage 1's, and a rerun or
    # a resume after an interruption compiles nothing it compiled before.
    c.jax_cache_dir = "jax_cache"
    c.pairs.guidance_scale = 3.0  # SD-CFG-3's teacher ODE
    c.pairs.num_steps = 50  # Table A1: 50 DDIM steps
    c.pairs.resolution = 32
    c.pairs.num_pairs = 4096  # 3,072 before 2026-12-06: more pairs, fewer steps (FIDELITY.md, the Quickstart's budget)
    c.pairs.batch_size = 256
    c.pairs.shard_size = 1024
    c.pairs.prompt_field = "caption"
    # The budget fits 30 min on the slow end of the 2-core machines measured (BENCHMARKS.md, "The MNIST job"):
    # 500 stage-1 steps (1,000 before 2026-12-06) and 100 stage-2 steps (200 before); configs/mnist_long.py is the
    # budget that reaches the teacher.
    c.train.num_steps = 500
    c.train.batch_size = 64
    c.train.lr = 5e-4  # 5× Table A1: a 1M-parameter U-Net; at 1e-4 it needs ~3× the steps (BENCHMARKS.md)
    c.train.lr_end = 1e-5
    c.train.ema_start = 200
    c.train.ema_beta = 0.99
    c.train.dtype = "float32"
    c.train.holdout = 64
    c.train.num_samples = 8
    c.train.log_every = 50
    c.train.eval_every = 500
    c.train.sample_every = 500
    c.train.ckpt_every = 500
    c.train.prefetch = 256
    c.stage2.num_steps = 100
    # G's two gradient parts pulled back once as their sum, their norms not logged (bench/compile_probe.py: the
    # stage-2 step 0.73× the time, 0.86× the compile on 2 cores); bench/fidelity.py's stage-2 rows turn it back on.
    c.stage2.log_grad_parts = False
    c.stage2.lr = 2e-4
    c.stage2.batch_size = 64
    c.stage2.log_every = 50
    c.stage2.eval_every = 100
    c.stage2.sample_every = 100
    c.stage2.ckpt_every = 100
    c.disc.lr = 2e-4
    # D reads clean latents at timestep 500, not 0 (paper: unstated for SD). Probe with G training, R1 on the mean
    # score (FIDELITY.md, the D probe, seed 0): D's held-out accuracy over steps 100-500 averaged 0.88 (min 0.67) at
    # t = 500 vs 0.75 (min 0.50, back at chance for ~100 steps after an R1 spike) at t = 0.
    c.disc.timestep = 500
    # D's gradient clipped at global norm 10 (paper: none stated). R1 still spikes once D has sharpened (penalty
    # 12-65 against ≤ 1 otherwise); unclipped, a spike's gradient fills D's Adam ν (β₂ 0.999 keeps it ~1,000 steps)
    # and D falls back to chance for ~100 steps (one 500-step stage-2 row ended with D at chance: FIDELITY.md).
    # Clipped at 10 (the GAN gradient's norm is 5-10 once D has learned), D held 0.92-1.00 held-out from step 100 to
    # 500 through five spikes (the D probe, G training, seed 0).
    c.disc.grad_clip = 10.0
    c.loss.encoder = "mnist"  # the world's LatentLPIPS files: mnist_latent_vgg16.pth.tar, mnist_latest_vgg16_tuned.pth
    c.loss.kind = "e_latent_lpips_star"  # SD-CFG-3's E-LatentLPIPS* (bg + cutout) with the world's LatentVGG
    c.eval.prompt_field = "caption"
    c.eval.real_name = ""  # filled by the world (mnist_heldout_s<seed>)
    c.eval.num_images = 500  # the 500 held-out captions, one image each
    c.eval.metrics = "fd,fd_pr,prompt_acc,teacher_dist"
    c.eval.pr_num = 500
    c.eval.teacher_dist_num = 500
    c.eval.batch_size = 250
    c.report.enabled = True  # real floor, teacher ODE, teacher x0, student: one table + a grid
    c.report.grid_images = 80  # every digit × colour caption once, teacher row over student row
    c.sample.images_per_prompt = 1
    c.sample.teacher = True
    c.sample.grid_columns = 8
    c.log_every_s = 20.0
    return c
