"""Every default of a d2g_jax run, one commented field each (paper: Table A1, §4 "Training details").

Experiment files (`sd15.py`, `sd15_cfg8.py`, `sdxl.py`, `tiny.py`) call `get_config()` and override a few fields.
Any field can be overridden on the command line: `--config.pairs.guidance_scale=8`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Which phase to run: "all" runs pairs → train (stage 1, then stage 2) → export, each resuming where it stopped;
    # "pairs", "train" or "export" runs that phase alone; "sample" and "eval" use the exported generator
    # ("serve": on a local demo page);
    # "verify" checks the workdir's checkpoints, export and pair shards against their digests/checksums, prints a
    # table (verified / unverified / damaged) and exits non-zero on damage (writes nothing; run it before copying).
    c.mode = "all"
    c.seed = 0  # global seed: pair i's noise is fold_in(PRNGKey(seed), i), so any pair can be regenerated

    c.teacher = ml_collections.ConfigDict()
    c.teacher.path = ""  # diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder[_2]/, ...)
    c.teacher.variant = ""  # "" = plain weights, else a diffusers variant such as "fp16"
    c.teacher.dtype = "bfloat16"  # teacher compute dtype (Table A1: bfloat16); params stay float32 on device
    # Create a random tiny SD-architecture pipeline in <workdir>/tiny_teacher and use it as the teacher
    # (configs/tiny.py: the whole job on a CPU in minutes, no downloaded weights).
    c.teacher.tiny = False

    c.pairs = ml_collections.ConfigDict()
    c.pairs.prompts = ""  # .txt (one per line) / .jsonl / .parquet file, or "tfds:NAME[:SPLIT[:FEATURE]]"
    c.pairs.prompt_field = ""  # JSONL key / parquet column ("" = first of text, caption, prompt)
    c.pairs.num_pairs = 3_000_000  # Table A1, SD-CFG-3: 3.0M pairs
    c.pairs.guidance_scale = 3.0  # Table A1 / §4: SD-CFG-3 (CFG scale of the teacher ODE)
    c.pairs.num_steps = 50  # Table A1: 50 DDIM steps
    c.pairs.resolution = 512  # image side in pixels; latents are resolution / vae_scale_factor (64 for SD1.5)
    c.pairs.batch_size = 64  # global batch of the jitted DDIM scan (split over all devices)
    c.pairs.shard_size = 4096  # pairs per ArrayRecord shard
    c.pairs.dir = ""  # "" = <workdir>/pairs
    # Noise seed of the pairs; -1 = config.seed. Set it to share one pair set between training runs of other seeds
    # (the fidelity study's rows: --config.seed=k --config.pairs.seed=0 --config.pairs.dir=<shared>).
    c.pairs.seed = -1
    # How a rerun checks the shards already on disk: "ends" (record count + first/last record; fast) or "full"
    # (every record decoded and checksummed; a damaged shard is named, with the fix: delete it and rerun).
    c.pairs.verify = "ends"

    # Stage 1 (ODE distillation; Table A1 "First stage"). Values: SD-CFG-3.
    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 150_000  # Table A1: first-stage iterations (SD-CFG-3 150k, SD-CFG-8 50k, SDXL 20k)
    c.train.batch_size = 256  # global batch (Table A1: 256; SD-CFG-8 2048→1024, SDXL 1024→512, stage 1→2)
    c.train.grad_accum = 1  # micro-batches per step (Table A1: 1); batch_size is split into them
    c.train.lr = 1e-4  # Table A1: G learning rate 1e-4 → 1e-5
    c.train.lr_end = 1e-5
    c.train.lr_schedule = "cosine"  # shape of the 1e-4 → 1e-5 decay over num_steps (paper: unspecified)
    c.train.warmup_steps = 0
    # How Table A1's "1e-4 → 1e-5" reads (the paper does not say; FIDELITY.md measures both):
    #   "per_stage": a decay from lr to lr_end within each stage (stage 1: train.lr → train.lr_end; stage 2 restarts
    #                at stage2.lr → stage2.lr_end), shape train.lr_schedule;
    #   "stage_switch": the arrow is a stage switch like the batch-size arrows of the same table: stage 1 runs at
    #                train.lr constant, stage 2 at stage2.lr_end constant (D keeps its own disc.* schedule: it only
    #                exists in stage 2, so a stage switch says nothing about it).
    # Default per_stage (the reading the code had); configs/sd15*.py and sdxl.py use stage_switch: Table A1 writes
    # the batch-size stage switches with the same arrow ("2048→1024"), and FIDELITY.md measured no difference on the
    # MNIST world (stage 2: FD 17.93 / 18.09 vs 18.03 / 18.47 on seeds 0 / 1, inside the seed spread), so the paper's
    # notation decides.
    c.train.lr_reading = "per_stage"
    c.train.b1 = 0.9  # Table A1: G β1
    c.train.b2 = 0.999  # Table A1: G β2
    c.train.adam_eps = 1e-8
    c.train.weight_decay = 1e-2  # Table A1 (decoupled, AdamW-style)
    c.train.weight_decay_attention = 1e-5  # Table A1: on attention (attn1/attn2) parameters
    c.train.grad_clip = 0.0  # global-norm gradient clipping; 0 = off (paper: none stated)
    c.train.ema_start = 4000  # Table A1: G EMA start 4k
    c.train.ema_beta = 0.9999  # Table A1: G EMA β
    c.train.dtype = "bfloat16"  # Table A1: bfloat16 compute; master weights and optimiser state float32
    c.train.remat = "none"  # U-Net block remat: "none" or a jax.checkpoint_policies name (e.g. nothing_saveable)
    c.train.holdout = 256  # last pairs of the dataset held out for eval metrics and the sample grid
    # Train (both stages) on the first max_pairs pairs of the set only (0: all but the held-out ones). The held-out
    # pairs stay the set's last `holdout`, so rows at several pair counts on prefixes of one set share them
    # (FIDELITY.md, the Table 6 analogue).
    c.train.max_pairs = 0
    c.train.num_samples = 8  # columns of the teacher-vs-student sample grid
    c.train.log_every = 100  # steps between train metric writes (TensorBoard, log, <stage>/metrics.jsonl)
    c.train.eval_every = 2000  # steps between held-out evaluations (0 = never)
    c.train.sample_every = 2000  # steps between sample grids (0 = never)
    c.train.ckpt_every = 2000  # steps between checkpoints (and at the last step)
    c.train.stop_after = 0  # stop this process after that many steps, checkpointed (preemption drill); 0 = off
    c.train.keep = 3  # checkpoints kept
    c.train.async_ckpt = True  # Orbax asynchronous saves
    c.train.prefetch = 256  # records buffered by the grain reader

    # Stage 2 (Table A1 "second stage", §3.3): G fine-tuned with L_distil + λ_GAN · L_GAN against the multi-scale
    # conditional diffusion discriminator (config.disc). G fields not listed here come from config.train.
    # It starts from the last stage-1 checkpoint (G, EMA; fresh optimisers; D from the teacher).
    c.stage2 = ml_collections.ConfigDict()
    c.stage2.num_steps = 10_000  # Table A1: second-stage iterations (SD-CFG-3/8 10k, SDXL 30k); 0 = no stage 2
    c.stage2.batch_size = 256  # Table A1: SD-CFG-3 256, SD-CFG-8 1024, SDXL 512
    c.stage2.gan_weight = 0.25  # Table A1: L_GAN strength λ_GAN (SD 0.25, SDXL 1.0)
    c.stage2.lr = 1e-4  # Table A1: G learning rate 1e-4 → 1e-5 (the schedule restarts over the stage-2 steps)
    c.stage2.lr_end = 1e-5
    # The stage-2 EMA (paper: unstated). False: stage 1's EMA carries on (β = train.ema_beta from stage-2 step 0), so
    # after SD's 10k stage-2 steps 0.9999^10k = 37% of the exported EMA is still stage-1 weights. True: it restarts
    # from the weights stage 2 starts from and follows them exactly until stage2.ema_start, then averages.
    # FIDELITY.md: no measurable difference on the MNIST world (FD 18.07 / 18.52 restart vs 18.03 / 18.47 carry, seeds
    # 0 / 1); Table A1 gives one "G ema start 4k" for the whole run, so every config carries the EMA on (False).
    c.stage2.ema_restart = False
    c.stage2.ema_start = 0  # with ema_restart: the restarted EMA's start step (must be 0 without a restart)
    # "simultaneous": G and D updated from one G forward, G's GAN gradient through D before this step's D update
    # (4 U-Net passes per sample). "alternating": G's update first, then D's on the updated G's output (a second G
    # forward: 5 passes per sample, Table A1's stage-2 NFE; StyleGAN2/GigaGAN's order).
    # FIDELITY.md: alternating = simultaneous to two decimals on the MNIST world (FD 18.03 / 18.47, seeds 0 / 1);
    # every config keeps "simultaneous" (4 passes, no measured gain from the 5th).
    c.stage2.update_order = "simultaneous"
    # G's distillation and GAN gradients pulled back through G apart, to log their norms and ratio (g_grad_distill,
    # g_grad_gan, gan_grad_ratio; paper: not logged): one more G backward per step. False: their sum is pulled back
    # once (the same update up to float rounding), the three are not logged — on the MNIST world's 2-core CPU the
    # stage-2 step takes 0.73× the time and compiles in 0.86× (bench/compile_probe.py, BENCHMARKS.md).
    c.stage2.log_grad_parts = True
    c.stage2.log_every = 100
    c.stage2.eval_every = 1000  # 0 = never
    c.stage2.sample_every = 1000  # 0 = never
    c.stage2.ckpt_every = 1000
    c.stage2.stop_after = 0  # stop this process after that many stage-2 steps, checkpointed; 0 = off
    c.stage2.init_from = ""  # "" = this workdir's stage 1; else another run's workdir (same teacher): skip stage 1

    # The discriminator and its optimiser (Table A1 "D", Table 2 ablation switches).
    # Table 2 rows: "+ Diffusion D": z_cond=False, r1_gamma=0, multiscale_in/out=False, mix_match_fraction=0;
    # "+ z conditional D": z_cond=True; "+ Single-sample R1": r1_gamma=0.01; "+ Multi-scale training":
    # multiscale_in=multiscale_out=True; "+ Mix-and-match": mix_match_fraction > 0 (all on = the defaults).
    c.disc = ml_collections.ConfigDict()
    c.disc.z_cond = True  # condition D on the generator's noise z (zero-initialised conv after conv_in)
    c.disc.multiscale_in = True  # resized latent injected at every down block (zero-initialised convs)
    c.disc.multiscale_out = True  # three read-outs (skip / upsampled / combined) at every decoder scale
    c.disc.r1_gamma = 0.01  # Table A1: single-sample R1 strength (SDXL: none → 0); 0 = off
    c.disc.r1_interval = 16  # Table A1: lazy R1 every 16 D steps (γ scaled by the interval)
    c.disc.r1_samples = 1  # R1 on this many real examples of each batch (1 = the paper's single-sample R1)
    # Which steps run the lazy R1: those with step % r1_interval == r1_offset (0 = step 0, 16, 32, …: the first D
    # step is an R1 step). Paper: unstated. FIDELITY.md (D probe) measures both.
    c.disc.r1_offset = 0
    # The per-sample score R1 differentiates (paper: unstated; the loss is "computed independently at each location"):
    # "sum" = StyleGAN2's logits.sum() over a sample's L output locations (a map's penalty grows with L²: the behaviour
    # before issue 20), "mean" = the mean over the locations, the scale the GAN loss itself averages.
    # Default "mean" (FIDELITY.md, the D probe): with "sum", D never learns on the MNIST world even with G frozen
    # (held-out accuracy 0.56 after 500 steps; R1 off: 0.99). Each R1 step's gradient is ~100× the GAN loss's and
    # lands in the Adam moments D shares with it: √ν jumps to 0.025 at step 0 and stays (β₂ 0.999), ~85× the GAN
    # gradient's RMS, so every later D step is ~85× too small. Skipping step 0 does not cure it (0.70 at 500).
    # With "mean", R1 stays at the loss's scale and D learns (0.96 at 200, R1 on). The L² factor grows with the
    # latent: 64×64 SD maps would be hit far harder than the world's 8×8.
    c.disc.r1_reduce = "mean"
    # How the U-Net's ε-output enters the GAN loss as a read-out (paper: "the adversarial loss is computed
    # independently at each location of the U-Net discriminator output"; the channels are unstated):
    # "elements" = each of its C channels at each location a logit (the old behaviour), "channel_mean" = one logit
    # per location (the channel mean, like the multi-scale heads), "off" = the multi-scale heads alone.
    c.disc.eps_map = "elements"
    # Whose batch r1_samples counts in: "batch" = the global batch (r1_samples rows in all); "device" = each
    # data-parallel slice, as the paper's "one sample of each mini-batch" on 16-64 GPUs reads (r1_samples × slices).
    # Default "batch" (single-device runs: one sample); configs/sd15*.py use "device": the paper applies R1 "only to a
    # single sample of each mini-batch" to bound per-GPU memory, i.e. one per GPU's mini-batch (16-64 GPUs), and
    # FIDELITY.md measured no harm from 16 samples on the MNIST world (FD 18.04 / 18.48 vs 18.03 / 18.47, seeds 0 /
    # 1). SDXL: no R1.
    c.disc.r1_scope = "batch"
    c.disc.r1_groups = 0  # slices for r1_scope="device"; 0 = one per device (set it to emulate a GPU count)
    c.disc.mix_match_fraction = 0.25  # share of D's fake batch replaced by mismatched real latents (paper: unstated)
    c.disc.mix_match_types = "noise,text,both"  # what the replaced rows mismatch, cycled over those rows
    c.disc.noise_aug = False  # Table A1 "noise augment before D" (SDXL: True): x_t = α_t x + σ_t ε, t random
    c.disc.noise_aug_t_min = 0  # timestep range of that noise (paper: unstated; UFOGen samples the whole schedule)
    c.disc.noise_aug_t_max = 999
    # D's timestep when noise_aug is off (D sees clean latents; paper: unstated for SD). At t = 0 the U-Net's
    # ε-output is ~1/σ₀ ≈ 34× as sensitive to its input as at t ~ 500: configs/mnist.py uses 500 (FIDELITY.md).
    c.disc.timestep = 0
    c.disc.remat = ""  # "" = config.train.remat
    c.disc.lr = 1e-4  # Table A1: D learning rate 1e-4 → 1e-5
    c.disc.lr_end = 1e-5
    c.disc.lr_schedule = "cosine"
    c.disc.warmup_steps = 0
    c.disc.b1 = 0.9  # Table A1: D β1 (SDXL 0.0)
    c.disc.b2 = 0.999  # Table A1: D β2 (SDXL 0.99)
    c.disc.adam_eps = 1e-8
    c.disc.weight_decay = 1e-2  # Table A1
    c.disc.weight_decay_attention = 1e-5  # Table A1
    c.disc.grad_clip = 0.0

    # The distillation loss (Table A1 "L_distil").
    c.loss = ml_collections.ConfigDict()
    # e_latent_lpips | e_latent_lpips_star (SD-CFG-3: mean of E-LatentLPIPS and LatentLPIPS) | latent_lpips |
    # lpips_pixel (VAE decode + LPIPS-VGG, ablation) | mse (mean over latent elements) | pseudo_huber
    # (√(‖x − y‖² + c²) − c per sample, consistency models' loss; Table 1's Pseudo-Huber row)
    c.loss.kind = "e_latent_lpips_star"
    c.loss.huber_c = 0.0  # pseudo_huber's c; 0 = 0.00054·√d (d = latent elements per sample; Song & Dhariwal 2023)
    # E-LatentLPIPS* = the augmented and the plain distance combined by "mean" (the default: a distance on
    # E-LatentLPIPS's scale, so λ_GAN keeps its meaning) or "sum" (doubles the distillation term against λ_GAN).
    # Every config keeps "mean" (FIDELITY.md: sum 17.98 vs mean 18.03, one seed, inside the noise; a sum would
    # silently halve λ_GAN's relative weight).
    c.loss.star_reduce = "mean"
    c.loss.augment = "bgo"  # Table A1, SD-CFG-3: bg + cutout (SD-CFG-8 / SDXL: bgco)
    c.loss.l1 = True  # the official E-LatentLPIPS adds mean |x − y| of the raw latents
    c.loss.weight = 1.0  # Table A1: L_distil strength
    c.loss.encoder = "sd15"  # latent space of the LatentVGG checkpoint: sd15 | sd21 | sdxl | sd3 | flux
    c.loss.ckpt_dir = ""  # folder with {encoder}_latent_vgg16.pth.tar and {encoder}_latest_vgg16_tuned.pth
    c.loss.random_weights = False  # random LatentVGG (tiny/debug runs only, no checkpoint files)
    c.loss.dtype = ""  # "" = train.dtype
    c.loss.pixel_vgg16 = ""  # lpips_pixel only: torchvision vgg16-397923af.pth
    c.loss.pixel_lin = ""  # lpips_pixel only: lpips weights/v0.1/vgg.pth

    # Export of the EMA generator as a diffusers U-Net folder (<workdir>/export/unet).
    c.export = ml_collections.ConfigDict()
    c.export.dtype = "float32"  # safetensors dtype: float32 | float16 | bfloat16
    c.export.dir = ""  # "" = <workdir>/export

    # One-step sampling with the trained generator (--config.mode=sample; d2g_jax/generate.py).
    c.sample = ml_collections.ConfigDict()
    c.sample.prompts = ""  # prompt file (.txt/.jsonl/.parquet) or tfds:…, as config.pairs.prompts
    c.sample.prompt_field = ""  # JSONL key / parquet column ("" = first of text, caption, prompt)
    c.sample.prompt = ""  # or prompts on the command line, "|"-separated: "a cat|a dog on a beach"
    c.sample.num_prompts = 0  # read at most this many prompts from the file (0 = all)
    c.sample.images_per_prompt = 1  # images per prompt (different seeds)
    c.sample.seed = 0  # image i uses noise jax.random.normal(PRNGKey(seed + i), latent shape)
    c.sample.batch_size = 0  # global batch of one jitted call (0 = one image per device)
    c.sample.unet = ""  # "" = this run's latest export (exported first if needed); else a diffusers U-Net folder
    c.sample.teacher = False  # also run the teacher's ODE (pairs.guidance_scale, pairs.num_steps) on the same noise
    c.sample.out_dir = ""  # "" = <workdir>/samples/step_<N>
    c.sample.grid_columns = 8
    c.sample.dtype = ""  # U-Net/text compute dtype ("" = teacher.dtype); the VAE decodes in float32

    # The local demo page (--config.mode=serve; d2g_jax/serve.py): the student of `sample.unet` (or the latest
    # export) with `sample.dtype`, and the teacher on the same noise (pairs.num_steps DDIM steps, CFG
    # pairs.guidance_scale).
    c.serve = ml_collections.ConfigDict()
    c.serve.host = "127.0.0.1"  # localhost only; "0.0.0.0" (or an interface's address) opens it to the network
    c.serve.port = 8000  # 0 = any free port (the log names it)
    c.serve.max_images = 8  # images per request; batch sizes 1, 2, 4, … up to it are compiled at start-up
    c.serve.teacher = True  # load the teacher for the page's "teacher on the same noise" toggle
    c.serve.queue = 64  # requests waiting per model before the server answers 503 (busy)

    # Evaluation with the paper's protocol (--config.mode=eval; d2g_jax/eval/; §4 "Evaluation protocols").
    # Defaults: FID-30k / CLIP-30k / P&R-10k on COCO2014 val (Tables 1-3). COCO2017 (Tables 4-5): num_images 5000,
    # real images = the 5,000 val2017 images, DreamSim-5k and DreamDiv on.
    c.eval = ml_collections.ConfigDict()
    c.eval.prompts = ""  # COCO captions_val2014.json (or .txt/.jsonl/.parquet/tfds:…): the captions to sample from
    c.eval.prompt_field = ""
    c.eval.num_images = 30_000  # generated images for FID and CLIP score (FID-30k; COCO2017: 5k)
    c.eval.real = ""  # real images: a folder (searched recursively for .jpg/.jpeg/.png) or tfds:NAME:SPLIT[:FEATURE]
    c.eval.real_name = "coco2014_val"  # dataset name in the reference-statistics cache key
    c.eval.num_real = 0  # real images used (0 = all: 40,504 for COCO2014 val)
    # Cache of reference statistics (one .npz per dataset/size/resolution/extractor); "" = <workdir>/eval/reference.
    c.eval.stats_dir = ""
    c.eval.resolution = 256  # GigaGAN protocol: center crop + PIL LANCZOS to 256 before clean-fid's resize to 299
    # any of fid, pr, clip, dreamsim, dreamdiv; with eval.classifier also fd, fd_pr, prompt_acc, teacher_dist
    c.eval.metrics = "fid,pr,clip"
    c.eval.pr_num = 10_000  # Precision & Recall (pr and fd_pr) on this many real and generated images (paper: 10k)
    c.eval.pr_k = 3  # k-th nearest neighbour radius (Kynkäänniemi et al. 2019), for pr and fd_pr
    c.eval.dreamsim_num = 5_000  # DreamSim-5k: student vs teacher on the same noise (teacher ODE as the pairs')
    c.eval.dreamdiv_prompts = 5_000  # DreamDiv-5k (Table 5): prompts, each with dreamdiv_per_prompt images (paper: 8)
    c.eval.dreamdiv_per_prompt = 8
    c.eval.inception = ""  # clean-fid's inception-2015-12-05.pt (file or folder)
    c.eval.clip = ""  # transformers CLIPModel folder for CLIP score (paper: OpenCLIP ViT-g-14 laion2b_s12b_b42k)
    c.eval.dreamsim = ""  # DreamSim checkpoint folder (the unzipped release), for dreamsim / dreamdiv
    c.eval.dreamsim_type = "ensemble"  # DreamSim's default model
    c.eval.random_extractors = False  # tiny/smoke runs only: random-weight extractors written under <workdir>/eval
    c.eval.batch_size = 0  # generation batch (0 = sample.batch_size)
    c.eval.seed = 2024  # caption choice and noise seeds (image i: PRNGKey(seed + i))
    # "" = this run's latest export; else a diffusers U-Net folder (<teacher>/unet: the teacher's one-step x0)
    c.eval.unet = ""
    # evaluate the teacher's 50-step ODE instead of the student (the paper's teacher rows; needs no export)
    c.eval.teacher = False
    c.eval.save_images = 0  # write the first N generated images as PNG to <workdir>/eval/<tag>_images/
    c.eval.every = 0  # steps between small evaluations during training (0 = never); uses eval.subset images
    c.eval.subset = 1_000
    # Attribute-classifier metrics (d2g_jax/eval/attributes.py), for worlds of small images with named attributes
    # (e.g. d2g_jax/world/): fd = Fréchet distance of its penultimate features vs eval.real, fd_pr = their precision
    # & recall, prompt_acc = share of images showing every attribute class the prompt names (+ per attribute),
    # teacher_dist = 1 − cos of the features of student and teacher image on the same noise (+ pixel RMS). Images
    # go to the classifier at their native resolution (its input_size): eval.resolution is not used for them.
    c.eval.classifier = ""  # classifier folder (config.json + model.safetensors); when set, samples.jsonl of the
    #                         sample mode and of eval.save_images also records parsed and predicted attributes
    c.eval.teacher_dist_num = 5_000  # teacher_dist on the first N images (as dreamsim_num for DreamSim)
    # Evaluate a folder of captioned images instead of a generator (e.g. real images scored as if generated: the
    # floor row): images + captions.jsonl ({"file", "caption"} per line; d2g_jax's dataset format) or samples.jsonl.
    c.eval.images = ""
    c.eval.images_num = 0  # with eval.images: this many images, a seeded (eval.seed) random subset; 0 = all

    # The closing comparison of --config.mode=all (configs/mnist.py): eval.metrics for the real floor, the teacher's
    # ODE, its one-step x0 and the student, as a table (<workdir>/report/), plus a teacher-over-student grid.
    c.report = ml_collections.ConfigDict()
    c.report.enabled = False
    c.report.real = ""  # captioned real images scored as if generated (the floor row); "" = no floor row
    c.report.grid_images = 16  # prompts of the grid (from config.sample's prompts), each teacher over student
    # rows of the table, any of real, teacher, teacher_x0, student (the fidelity study's rows: student only)
    c.report.rows = "real,teacher,teacher_x0,student"

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel axis size; -1 = all devices not used by fsdp
    c.mesh.fsdp = 1  # parameter-sharding axis size

    # The host CPU as JAX devices (applied by d2g_jax.main before JAX starts; ignored by GPU/TPU computations). XLA
    # runs one CPU device's program on about one core; N devices put the data-parallel mesh across the cores (the
    # MNIST world on 2 cores, BENCHMARKS.md: pairs 1.49x, stage 1 1.08x, stage 2 1.05x of 1 device). 0 = JAX's
    # default (1 device).
    # An XLA_FLAGS --xla_force_host_platform_device_count set by hand wins over it.
    c.cpu = ml_collections.ConfigDict()
    c.cpu.host_devices = 0

    # JAX's persistent compilation cache (set by d2g_jax.main before anything compiles): a compiled program is
    # stored there and reused by every later compile of the same program — in this run (stage 2's held-out eval and
    # grid are stage 1's programs) and by reruns, resumes and other runs of the same shapes. "" = off; a relative
    # path is inside the workdir. Programs that compile in under 1 s are not stored.
    c.jax_cache_dir = ""

    # A stand-in world for the teacher and its datasets (configs/mnist.py): a module whose `prepare(config, workdir)`
    # checks/writes its files and returns values for empty config fields (teacher.path, pairs.prompts, eval.real,
    # …), applied before any phase. Imported by this name only; the system modules never import it.
    c.world = ml_collections.ConfigDict()
    c.world.provider = ""  # e.g. "d2g_jax.world.mnist"; "" = none (a real teacher folder and datasets)
    c.world.dir = ""  # the built world ("" = the provider's default: d2g_jax/world/assets/mnist, shipped)
    c.world.seed = 0  # the seed the world must have been built with (a world of another seed is refused)

    # Identity fields (anything but logging/checkpoint cadence, mesh, phase, export/sample/eval) that may differ from
    # the workdir's run.json on this resume, comma-separated (e.g. "train.lr,train.grad_clip" after a NaN stop):
    # run.json takes the new values and records the change and its step in its history. "" = none may differ.
    c.resume_changes = ""

    c.log_every_s = 30.0  # progress/ETA report period (seconds)
    return c
