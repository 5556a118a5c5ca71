"""Attribute classifier: a small pixel-space CNN used as an evaluation feature extractor (`config.eval.classifier`).

For worlds where the field's extractors (Inception, CLIP, DreamSim) mean nothing — small images of known, named
attributes — one classifier gives every number the paper's protocol needs: its penultimate features stand in for
Inception's (Fréchet distance `fd`, precision/recall `fd_pr`) and DreamSim's (`teacher_dist`), and its heads check
that an image shows what its prompt names (`prompt_acc`). Nothing here knows a particular world: the attributes and
the words that name their classes come from the classifier folder.

A classifier folder holds

* `config.json`: `{"kind": "d2g_jax.attribute_classifier", "version": 1, "input_size": 32, "stages": [[16], [32,
  32], [64]], "feature_dim": 64, "mean": [r, g, b], "std": [r, g, b], "attributes": {"digit": ["zero", …],
  "colour": ["red", …]}}`. `attributes` is ordered: each attribute's list holds the words (or phrases) that name its
  classes in prompts, in class-index order. `mean` / `std` normalise pixels scaled to [0, 1].
* `model.safetensors`: the Flax parameters, '/'-joined paths (`conv_0_0/kernel`, `features/bias`, `head_digit/…`).

Architecture (`AttributeCNN`): per stage, 3×3 convolutions (SAME, ReLU) with the stage's channel counts, then a 2×2
max-pool; the last map is flattened into a dense layer of `feature_dim` + ReLU — the *penultimate features* — and
one dense softmax head per attribute (dropout before the heads while training). Images go in at their native
resolution (uint8 RGB `input_size`×`input_size`; no crop or resize, unlike the GigaGAN protocol of the Inception
metrics): a generator at another resolution is refused, naming both sizes.

Prompt parsing (`parse_attributes`): per attribute, whole-word (whole-phrase), case-insensitive matches of its class
words, longer phrases first without overlap ("light blue" is not also "blue"); an attribute is parsed when exactly
one of its classes is named, else it is None (the prompt is *unparseable* for it).

`fit` trains a classifier on batches the caller draws (augmentation inside the jitted step, deterministic in the
seed); a world supplies its data (e.g. `d2g_jax/world/classifier.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from d2g_jax import files
from d2g_jax.models.weights import write_safetensors

__all__ = [
    "AttributeCNN",
    "AttributeClassifier",
    "ClassifierConfig",
    "ClassifierError",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "fit",
    "init_params",
    "load_classifier",
    "parse_attributes",
    "save_classifier",
]

KIND = "d2g_jax.attribute_classifier"
VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
NATIVE_PROTOCOL = "native-uint8-rgb{res}: no crop or resize (attribute classifier)"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_INFER_BATCH = 256  # images per jitted inference call (padded: one compile)


class ClassifierError(ValueError):
    """A classifier folder that is missing, malformed or does not match its architecture."""


# ------------------------------------------------------------------------------------------------------ the config


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Architecture, input and vocabulary of an attribute classifier (`config.json`).

    Attributes:
      attributes: ((name, (class word, …)), …) in order; class index = position of its word.
      input_size: image side in pixels (square RGB).
      stages: channel counts of the 3×3 convolutions of each stage; a 2×2 max-pool ends every stage.
      feature_dim: width of the penultimate (feature) layer.
      mean, std: per-channel normalisation of pixels scaled to [0, 1].
      dropout: dropout rate before the heads while training (stored for the record).
    """

    attributes: tuple[tuple[str, tuple[str, ...]], ...]
    input_size: int = 32
    stages: tuple[tuple[int, ...], ...] = ((16,), (32, 32), (64,))
    feature_dim: int = 64
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    dropout: float = 0.0

    def __post_init__(self):
        _validate(self, "ClassifierConfig")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.attributes)

    @property
    def classes(self) -> dict[str, tuple[str, ...]]:
        return dict(self.attributes)

    def to_json(self) -> dict[str, Any]:
        return {"kind": KIND, "version": VERSION, "input_size": self.input_size,
                "stages": [list(s) for s in self.stages], "feature_dim": self.feature_dim, "mean": list(self.mean),
                "std": list(self.std), "dropout": self.dropout,
                "attributes": {a: list(w) for a, w in self.attributes}}  # fmt: skip

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "config") -> ClassifierConfig:
        if not isinstance(d, Mapping):
            raise ClassifierError(f"{where}: expected a JSON object, got {type(d).__name__}.")
        if d.get("kind") != KIND:
            raise ClassifierError(f"{where}: 'kind' is {d.get('kind')!r}, not {KIND!r}: not an attribute-classifier "
                                  "config (write one with d2g_jax.eval.attributes.save_classifier).")  # fmt: skip
        if d.get("version") != VERSION:
            raise ClassifierError(f"{where}: 'version' {d.get('version')!r} is not supported (this code reads "
                                  f"version {VERSION}).")  # fmt: skip
        missing = [k for k in ("attributes", "input_size", "stages", "feature_dim", "mean", "std") if k not in d]
        if missing:
            raise ClassifierError(f"{where}: missing field(s) {missing}.")
        attrs = d["attributes"]
        if not isinstance(attrs, Mapping) or not attrs:
            raise ClassifierError(f"{where}: 'attributes' must be a non-empty object {{name: [class words]}}, "
                                  f"got {attrs!r}.")  # fmt: skip
        try:
            return cls(
                attributes=tuple((str(a), tuple(_words(w, f"{where}: attributes.{a}"))) for a, w in attrs.items()),
                input_size=_int(d["input_size"], f"{where}: input_size"),
                stages=tuple(tuple(_int(c, f"{where}: stages") for c in _list(s, f"{where}: stages"))
                             for s in _list(d["stages"], f"{where}: stages")),  # fmt: skip
                feature_dim=_int(d["feature_dim"], f"{where}: feature_dim"),
                mean=tuple(_float(v, f"{where}: mean") for v in _list(d["mean"], f"{where}: mean")),
                std=tuple(_float(v, f"{where}: std") for v in _list(d["std"], f"{where}: std")),
                dropout=_float(d.get("dropout", 0.0), f"{where}: dropout"),
            )
        except ClassifierError as e:
            if str(e).startswith(where):
                raise
            raise ClassifierError(f"{where}: {str(e).removeprefix('ClassifierConfig: ')}") from None


def _list(x, what: str) -> list:
    if not isinstance(x, (list, tuple)):
        raise ClassifierError(f"{what}: expected a list, got {x!r}.")
    return list(x)


def _int(x, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise ClassifierError(f"{what}: expected an integer, got {x!r}.")
    return int(x)


def _float(x, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ClassifierError(f"{what}: expected a number, got {x!r}.")
    return float(x)


def _words(x, what: str) -> list[str]:
    words = _list(x, what)
    if not all(isinstance(w, str) and w.strip() for w in words):
        raise ClassifierError(f"{what}: expected a list of non-empty strings (the class words), got {x!r}.")
    return [" ".join(w.lower().split()) for w in words]


def _validate(c: ClassifierConfig, where: str) -> None:
    if not c.attributes:
        raise ClassifierError(f"{where}: no attributes.")
    for name, words in c.attributes:
        if not _NAME.match(name):
            raise ClassifierError(f"{where}: attribute name {name!r} must match [a-z][a-z0-9_]* (it names a head "
                                  "and metric keys such as prompt_acc_<name>).")  # fmt: skip
        if len(words) < 2:
            raise ClassifierError(f"{where}: attribute {name!r} needs at least 2 classes, got {list(words)}.")
        if len(set(words)) != len(words):
            raise ClassifierError(f"{where}: attribute {name!r} repeats a class word: {list(words)}.")
    if len({n for n, _ in c.attributes}) != len(c.attributes):
        raise ClassifierError(f"{where}: attribute names repeat: {[n for n, _ in c.attributes]}.")
    if c.input_size < 1 or not c.stages or any(not s or min(s) < 1 for s in c.stages) or c.feature_dim < 1:
        raise ClassifierError(f"{where}: input_size, stages (non-empty lists of positive channel counts) and "
                              f"feature_dim must be positive, got {c.input_size}, {c.stages}, "
                              f"{c.feature_dim}.")  # fmt: skip
    if c.input_size % (2 ** len(c.stages)):
        raise ClassifierError(f"{where}: input_size {c.input_size} is not divisible by 2^{len(c.stages)} (one 2×2 "
                              "max-pool per stage).")  # fmt: skip
    if len(c.mean) != 3 or len(c.std) != 3 or min(c.std) <= 0:
        raise ClassifierError(f"{where}: mean and std need 3 values (RGB), std > 0; got {c.mean}, {c.std}.")
    if not 0.0 <= c.dropout < 1.0:
        raise ClassifierError(f"{where}: dropout must be in [0, 1), got {c.dropout}.")


# -------------------------------------------------------------------------------------------------------- the model


class AttributeCNN(nn.Module):
    """The classifier network: float32 [B, S, S, 3] pixels in [0, 255] → (features [B, D], (logits per attribute))."""

    config: ClassifierConfig

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        c = self.config
        mean = jnp.asarray(c.mean, jnp.float32)
        std = jnp.asarray(c.std, jnp.float32)
        h = (x.astype(jnp.float32) / 255.0 - mean) / std
        for s, chans in enumerate(c.stages):
            for i, ch in enumerate(chans):
                h = nn.relu(nn.Conv(ch, (3, 3), padding="SAME", name=f"conv_{s}_{i}")(h))
            h = nn.max_pool(h, (2, 2), strides=(2, 2))
        h = h.reshape(h.shape[0], -1)
        feats = nn.relu(nn.Dense(c.feature_dim, name="features")(h))
        z = nn.Dropout(c.dropout, deterministic=not train)(feats) if c.dropout else feats
        logits = tuple(nn.Dense(len(words), name=f"head_{name}")(z) for name, words in c.attributes)
        return feats, logits


def init_params(config: ClassifierConfig, seed: int) -> dict[str, Any]:
    """Flax's default initialisation (LeCun-normal kernels, zero biases) from `PRNGKey(seed)`; host numpy."""
    x = jnp.zeros((1, config.input_size, config.input_size, 3), jnp.float32)
    params = AttributeCNN(config).init(jax.random.PRNGKey(seed), x)["params"]
    return jax.tree.map(np.asarray, params)


def _abstract_params(config: ClassifierConfig) -> dict[str, Any]:
    x = jax.ShapeDtypeStruct((1, config.input_size, config.input_size, 3), jnp.float32)
    return jax.eval_shape(lambda: AttributeCNN(config).init(jax.random.PRNGKey(0), jnp.zeros(x.shape)))["params"]


# ------------------------------------------------------------------------------------------------- folder save/load


def save_classifier(folder: str, config: ClassifierConfig, params: Any) -> str:
    """Writes `folder/config.json` and `folder/model.safetensors` (each atomically; the folder may hold other files).
    Checks the parameters against the architecture first."""
    flat = {"/".join(k): np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(params).items()}
    _check_tensors(flat, config, f"parameters given to save_classifier({folder!r})")
    os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, WEIGHTS_NAME), flat, {"format": "flax", "kind": KIND})
    files.atomic_write_json(os.path.join(folder, CONFIG_NAME), config.to_json())
    return folder


def _check_tensors(flat: Mapping[str, Any], config: ClassifierConfig, where: str) -> None:
    want = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(_abstract_params(config)).items()}
    missing = sorted(set(want) - set(flat))
    unexpected = sorted(set(flat) - set(want))
    shapes = sorted(f"{k}: {tuple(np.shape(flat[k]))} vs {want[k]}" for k in set(want) & set(flat)
                    if tuple(np.shape(flat[k])) != want[k])  # fmt: skip
    if missing or unexpected or shapes:
        parts = [f"missing {missing}" if missing else "", f"unexpected {unexpected}" if unexpected else "",
                 f"mis-shaped (got vs config) {shapes}" if shapes else ""]  # fmt: skip
        raise ClassifierError(f"{where}: tensors do not match the architecture in config.json: "
                              f"{'; '.join(p for p in parts if p)}. Re-save the classifier folder (config.json and "
                              "model.safetensors must come from the same save_classifier call).")  # fmt: skip


def read_classifier_config(folder: str) -> ClassifierConfig:
    """The `ClassifierConfig` of a classifier folder, with errors naming the file and the fix."""
    fix = ("point config.eval.classifier at a folder written by d2g_jax.eval.attributes.save_classifier "
           f"({CONFIG_NAME} + {WEIGHTS_NAME})")  # fmt: skip
    if not folder:
        raise ClassifierError(f"no attribute classifier configured (config.eval.classifier is empty): {fix}.")
    if not os.path.isdir(folder):
        raise ClassifierError(f"{folder}: not a folder (config.eval.classifier); {fix}.")
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ClassifierError(f"{path}: missing; {fix}.")
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ClassifierError(f"{path}: not valid JSON ({e}); {fix}.") from e
    return ClassifierConfig.from_json(d, path)


def load_classifier(folder: str) -> AttributeClassifier:
    """Loads a classifier folder (see the module docstring); every problem names its file."""
    from d2g_jax.models.weights import WeightsError, read_safetensors

    config = read_classifier_config(folder)
    wpath = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(wpath):
        raise ClassifierError(f"{wpath}: missing (the classifier's weights; {CONFIG_NAME} is there). Re-save the "
                              "folder with d2g_jax.eval.attributes.save_classifier.")  # fmt: skip
    try:
        flat = {k: np.array(v, np.float32) for k, v in read_safetensors(wpath).items()}
    except (WeightsError, ValueError) as e:
        raise ClassifierError(f"{wpath}: cannot read the classifier weights ({e}).") from e
    _check_tensors(flat, config, wpath)
    params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    return AttributeClassifier(config, params, os.path.abspath(folder))


# ------------------------------------------------------------------------------------------------- prompt parsing


def parse_attributes(text: str, attributes: Sequence[tuple[str, Sequence[str]]]) -> dict[str, int | None]:
    """{attribute: class index, or None unless exactly one of its classes is named} for `text` (see the module
    docstring: whole-word/phrase, case-insensitive, longer phrases first, no overlaps)."""
    low = " ".join(str(text).lower().split())
    out: dict[str, int | None] = {}
    for name, words in attributes:
        order = sorted(range(len(words)), key=lambda i: -len(words[i]))
        taken = np.zeros(len(low) + 1, bool)
        found = set()
        for i in order:
            phrase = re.escape(" ".join(words[i].lower().split()))
            for m in re.finditer(r"(?<![a-z0-9])" + phrase + r"(?![a-z0-9])", low):
                if not taken[m.start() : m.end()].any():
                    taken[m.start() : m.end()] = True
                    found.add(i)
        out[name] = found.pop() if len(found) == 1 else None
    return out


# ------------------------------------------------------------------------------------------------------ inference


class AttributeClassifier:
    """A loaded classifier: `clf(images)` → penultimate features (the reference-statistics extractor protocol),
    `clf.run(images)` → (features, {attribute: probabilities}), `clf.predict(images)` → {attribute: class index},
    `clf.parse(prompt)` → {attribute: class index | None}. Images: uint8 [N, S, S, 3] at the native resolution.
    `identity`: content fingerprint of config.json + model.safetensors (reference-statistics cache key)."""

    def __init__(self, config: ClassifierConfig, params: Any, folder: str = ""):
        from d2g_jax.eval.extractors import _tree_fingerprint

        self.config, self.folder = config, folder
        self.module = AttributeCNN(config)
        dev = jax.local_devices()[0]  # only process 0 extracts features (Evaluator); keep it on its own device
        self._device = dev
        self.params = jax.device_put(jax.tree.map(jnp.asarray, params), dev)
        fp = _tree_fingerprint(folder, [CONFIG_NAME, WEIGHTS_NAME]) if folder else "in-memory"
        self.identity = f"attribute-classifier/{fp}/native{config.input_size}"
        self.protocol = NATIVE_PROTOCOL.format(res=config.input_size)

        self._fn = _infer_fn(config)

    @property
    def names(self) -> tuple[str, ...]:
        return self.config.names

    @property
    def input_size(self) -> int:
        return self.config.input_size

    def check_images(self, images, what: str = "images") -> np.ndarray:
        x = np.asarray(images)
        s = self.config.input_size
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"{what}: the attribute classifier takes uint8 RGB [N, H, W, 3], got {x.dtype} "
                             f"{list(x.shape)}.")  # fmt: skip
        if x.shape[1:3] != (s, s):
            raise ValueError(f"{what}: {x.shape[1]}×{x.shape[2]} images, but the attribute classifier "
                             f"{self.folder or '(in memory)'} takes {s}×{s} ({CONFIG_NAME} input_size) at the native "
                             "resolution (no resize): generate at its resolution (config.pairs.resolution) or use a "
                             "classifier trained for this one.")  # fmt: skip
        return x

    def run(self, images, what: str = "images") -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(float32 features [N, D], {attribute: float32 probabilities [N, C]})."""
        x = self.check_images(images, what)
        feats, probs = [], []
        for s in range(0, x.shape[0], _INFER_BATCH):
            xb = x[s : s + _INFER_BATCH]
            n = xb.shape[0]
            if n < _INFER_BATCH:
                xb = np.concatenate([xb, np.zeros((_INFER_BATCH - n, *xb.shape[1:]), np.uint8)])
            f, p = self._fn(self.params, jax.device_put(xb.astype(np.float32), self._device))
            feats.append(np.asarray(f)[:n])
            probs.append([np.asarray(q)[:n] for q in p])
        if not feats:
            return np.zeros((0, self.config.feature_dim), np.float32), {
                a: np.zeros((0, len(w)), np.float32) for a, w in self.config.attributes}  # fmt: skip
        out = {a: np.concatenate([p[i] for p in probs]) for i, a in enumerate(self.names)}
        return np.concatenate(feats), out

    def __call__(self, images) -> np.ndarray:
        return self.run(images)[0]

    def predict(self, images) -> dict[str, np.ndarray]:
        """{attribute: int64 [N] argmax class}."""
        return {a: np.argmax(p, axis=-1) for a, p in self.run(images)[1].items()}

    def parse(self, prompt: str) -> dict[str, int | None]:
        return parse_attributes(prompt, self.config.attributes)

    def attribute_fields(self, prompts: Sequence[str], probs: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
        """Per image, the `samples.jsonl` fields: "attributes" (the classes its prompt names, as words; null for an
        attribute the prompt does not name exactly once), "predicted" (the classifier's argmax words) and
        "predicted_prob" (their probabilities, 4 decimals). `probs`: {attribute: [N, C]} from `run`."""
        out = []
        for i, p in enumerate(prompts):
            idx = {a: int(np.argmax(probs[a][i])) for a in self.names}
            out.append({"attributes": self.words(self.parse(p)), "predicted": self.words(idx),
                        "predicted_prob": {a: round(float(probs[a][i][idx[a]]), 4) for a in self.names}})  # fmt: skip
        return out

    def words(self, indices: Mapping[str, int | None]) -> dict[str, str | None]:
        """{attribute: class word (None stays None)}."""
        cls = self.config.classes
        return {a: (None if i is None else cls[a][int(i)]) for a, i in indices.items()}


# ------------------------------------------------------------------------------------------------------- training


def fit(
    config: ClassifierConfig,
    batches: Callable[[int], tuple[np.ndarray, np.ndarray]],
    *,
    steps: int,
    seed: int,
    lr: float = 2e-3,
    lr_end_fraction: float = 0.02,
    warmup: int = 100,
    weight_decay: float = 1e-4,
    label_smoothing: float = 0.0,
    augment: Callable[[Any, jax.Array], jax.Array] | None = None,
    log: Callable[[str], Any] | None = print,
    log_every: int = 100,
    callback: Callable[[int, Any], None] | None = None,
) -> dict[str, Any]:
    """Trains an `AttributeCNN` from `init_params(config, seed)`; returns host numpy parameters.

    `batches(step)` → (images uint8 or float [B, S, S, 3] in [0, 255], labels int [B, A] in attribute order[,
    aug]); the caller draws them deterministically. `augment(aug, images float32)` runs inside the jitted step on
    the batch's `aug` (a pytree of arrays the caller drew on the host: no random-number generator is compiled,
    which on CPU costs seconds per draw). Dropout keys: `fold_in(key(seed, impl="rbg"), step)`. Loss: mean over
    attributes of softmax cross-entropy (optional label smoothing); AdamW with linear warm-up and cosine decay to
    `lr · lr_end_fraction`, global-norm clip 1. Deterministic in `seed` and the batches on a given machine.
    `callback(step, params)` after each logged step.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be ≥ 1.")
    n_attr = len(config.attributes)
    tx, step_fn = _trainer(config, int(steps), float(lr), float(lr_end_fraction), int(warmup), float(weight_decay),
                           float(label_smoothing), augment)  # fmt: skip
    params = jax.tree.map(jnp.asarray, init_params(config, seed))
    opt = tx.init(params)
    base = jax.random.key(seed, impl="rbg")  # XLA's RngBitGenerator: compiles in a fraction of threefry's time

    t0 = time.perf_counter()
    for step in range(steps):
        x, y, *aug = batches(step)
        y = np.asarray(y, np.int32)
        if y.ndim != 2 or y.shape[1] != n_attr or y.shape[0] != len(x):
            raise ValueError(f"batches({step}) gave labels {y.shape}; expected [B, {n_attr}] ({config.names}).")
        if augment is not None and len(aug) != 1:
            raise ValueError(f"batches({step}) must return (images, labels, aug) when fit is given an augment.")
        params, opt, loss, accs = step_fn(params, opt, x, y, aug[0] if aug else None, base, step)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            if log is not None:
                acc = " ".join(f"{a}={float(v):.3f}" for a, v in zip(config.names, np.asarray(accs)))
                log(f"classifier step {step + 1}/{steps}: loss {float(loss):.4f}, train batch acc {acc} "
                    f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
            if callback is not None:
                callback(step + 1, params)
    return jax.tree.map(np.asarray, params)


@functools.lru_cache(maxsize=8)
def _trainer(config: ClassifierConfig, steps: int, lr: float, lr_end_fraction: float, warmup: int,
             weight_decay: float, label_smoothing: float, augment: Callable | None):  # fmt: skip
    """(optimiser, jitted step) of `fit`, built once per setting (a second run with the same setting, e.g. another
    seed, reuses the compiled step)."""
    import optax

    module = AttributeCNN(config)
    n_attr = len(config.attributes)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, max(steps - 1, 1)), max(steps, 2),
                                               lr * lr_end_fraction)  # fmt: skip
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=weight_decay))

    def loss_fn(p, x, y, key):
        _, logits = module.apply({"params": p}, x, train=True, rngs={"dropout": key})
        losses, accs = [], []
        for i, lg in enumerate(logits):
            onehot = optax.smooth_labels(jax.nn.one_hot(y[:, i], lg.shape[-1]), label_smoothing)
            losses.append(optax.softmax_cross_entropy(lg, onehot).mean())
            accs.append((jnp.argmax(lg, -1) == y[:, i]).mean())
        return sum(losses) / n_attr, jnp.stack(accs)

    @jax.jit
    def step_fn(p, o, x, y, aug, base, step):
        x = x.astype(jnp.float32)
        if augment is not None:
            x = augment(aug, x)
        (loss, accs), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, y, jax.random.fold_in(base, step))
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss, accs

    return tx, step_fn


@functools.lru_cache(maxsize=8)
def _infer_fn(config: ClassifierConfig):
    """Jitted (features, per-attribute softmax) of an architecture, shared by every classifier with that config."""
    module = AttributeCNN(config)

    def fn(params, x):
        feats, logits = module.apply({"params": params}, x)
        return feats, tuple(jax.nn.softmax(lg.astype(jnp.float32), axis=-1) for lg in logits)

    return jax.jit(fn)
