"""The default FID feature network: a small CNN classifier trained on the dataset's real
training images (docs/design.md §6; offline, so not Inception: say so in every report).

Its features are the 128 activations before the class layer. ``load_or_train`` caches the
trained network per dataset in a directory (orbax state and a JSON record with its test
accuracy), so every run on that dataset measures FID in the same space.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from baim_jax.evaluation.fid import Extractor
from baim_jax.files import read_json, write_json

FEATURES = 128


class FeatureNet(nnx.Module):
    """Two stride-2 3x3 convolutions (32, 64), a 128-unit feature layer, a class layer."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, *, rngs: nnx.Rngs):
        h, w, c = image_shape
        self.conv1 = nnx.Conv(c, 32, (3, 3), strides=2, rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (3, 3), strides=2, rngs=rngs)
        self.dense = nnx.Linear(-(-h // 4) * -(-w // 4) * 64, FEATURES, rngs=rngs)
        self.head = nnx.Linear(FEATURES, num_classes, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C]`` in [0, 1] -> ``[B, 128]``."""
        y = jax.nn.relu(self.conv1(x))
        y = jax.nn.relu(self.conv2(y))
        return jax.nn.relu(self.dense(y.reshape(y.shape[0], -1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


@nnx.jit
def _train_step(net: FeatureNet, opt: nnx.Optimizer, x, y):
    def loss(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    grads = nnx.grad(loss)(net)
    with jax.numpy_dtype_promotion("standard"):
        opt.update(net, grads)


@nnx.jit(graph=False)
def _features(net: FeatureNet, x):
    return net.features(x)


@nnx.jit(graph=False)
def _predict(net: FeatureNet, x):
    return jnp.argmax(net(x), axis=-1)


def _batched(fn, net, images: np.ndarray, batch: int = 500) -> np.ndarray:
    return np.concatenate([np.asarray(fn(net, jnp.asarray(images[i:i + batch])))
                           for i in range(0, len(images), batch)])


def train(images: np.ndarray, labels: np.ndarray, test_images: np.ndarray,
          test_labels: np.ndarray, *, num_classes: int, epochs: int = 5, batch_size: int = 64,
          learning_rate: float = 1e-3, seed: int = 0) -> tuple[FeatureNet, float]:
    """Trains the classifier; returns it and its accuracy on the test images."""
    net = FeatureNet(tuple(images.shape[1:]), num_classes, rngs=nnx.Rngs(seed))
    opt = nnx.Optimizer(net, optax.adam(learning_rate), wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(images))
        for i in range(0, len(images) - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            _train_step(net, opt, jnp.asarray(images[idx]), jnp.asarray(labels[idx]))
    accuracy = float(np.mean(_batched(_predict, net, test_images) == test_labels))
    return net, accuracy


def extractor(net: FeatureNet) -> Extractor:
    """``images [n, H, W, C] -> features [n, 128]`` (host arrays)."""
    return lambda images: _batched(_features, net, np.asarray(images, np.float32))


def load_or_train(cache: Path, name: str, images: np.ndarray, labels: np.ndarray,
                  test_images: np.ndarray, test_labels: np.ndarray, *, num_classes: int,
                  epochs: int = 5, seed: int = 0) -> tuple[FeatureNet, dict]:
    """The feature network of dataset ``name``, trained once and cached in ``cache/name``.

    Returns:
      the network and its record: ``{"name", "dataset", "test_accuracy", "epochs", "seed"}``.
    """
    path = Path(cache).absolute() / name
    record_file = path / "feature_net.json"
    net = FeatureNet(tuple(images.shape[1:]), num_classes, rngs=nnx.Rngs(seed))
    if record_file.exists():
        record = read_json(record_file, "feature network record")
        try:
            with ocp.StandardCheckpointer() as ckpt:
                state = ckpt.restore(path / "state", nnx.state(net))
        except Exception as e:  # orbax raises many types for damaged checkpoints
            raise ValueError(f"{path}/state: the feature network cannot be restored "
                             f"({type(e).__name__}); remove {path} to train it again") from None
        nnx.update(net, state)
        return net, record
    net, accuracy = train(images, labels, test_images, test_labels, num_classes=num_classes,
                          epochs=epochs, seed=seed)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / "state", nnx.state(net), force=True)
        checkpointer.wait_until_finished()
    record = {"name": "small CNN classifier (not Inception)", "dataset": name,
              "test_accuracy": accuracy, "epochs": epochs, "seed": seed}
    write_json(record_file, record)
    return net, record
