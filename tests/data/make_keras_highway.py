"""Makes tests/data/keras_highway.onnx: a highway CNN written in Keras and converted by tf2onnx,
the route of Keras users into ONNX Runtime (not run by the tests: it needs TensorFlow).

    python -m venv /tmp/tf && /tmp/tf/bin/pip install tensorflow-cpu tf2onnx
    /tmp/tf/bin/python tests/data/make_keras_highway.py tests/data/keras_highway.onnx

Made with tensorflow-cpu 2.21.0, keras 3.15.1, tf2onnx 1.17.0, opset 13. A 3->16 relu stem, then
three blocks of 16, 32 (stride 2, a strided 1x1 projection as the carry) and 32 channels: z =
BatchNormalization(x), H = relu(Conv3x3(z)), T = hard_sigmoid(Conv1x1(H)), y = H*T + (1-T)*c
with Keras layers; global average pooling and Dense(10). Keras 3's hard_sigmoid is relu6(a + 3)/6,
which tf2onnx spells Add, Clip, Mul. REMOVABLE channels have their gate row zeroed with bias -40
(T = 0 exactly) and no kept gate reads their H, so pruning them is exact.
"""

import sys

import keras
import numpy as np
import tensorflow as tf
import tf2onnx
from keras import layers

REMOVABLE = {16: [1, 4, 9], 32: [0, 5, 7, 20, 31]}


def block(x, width: int, stride: int, gates: list):
    z = layers.BatchNormalization()(x)
    h = layers.Conv2D(width, 3, strides=stride, padding="same", activation="relu")(z)
    gate_layer = layers.Conv2D(width, 1)
    t = layers.Activation("hard_sigmoid")(gate_layer(h))
    carry = x if stride == 1 and x.shape[-1] == width else layers.Conv2D(width, 1, strides=stride)(x)
    gates.append((gate_layer, width))
    one_minus_t = layers.Lambda(lambda v: 1.0 - v)(t)
    return layers.Add()([layers.Multiply()([h, t]), layers.Multiply()([one_minus_t, carry])])


def network() -> keras.Model:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    inputs = keras.Input((32, 32, 3), name="input")
    x, gates = layers.Conv2D(16, 3, padding="same", activation="relu")(inputs), []
    for width, stride in ((16, 1), (32, 2), (32, 1)):
        x = block(x, width, stride, gates)
    model = keras.Model(inputs, layers.Dense(10)(layers.GlobalAveragePooling2D()(x)))
    for layer in model.layers:  # statistics of a trained network, not the identity
        if isinstance(layer, layers.BatchNormalization):
            n = layer.get_weights()[0].shape
            layer.set_weights(
                [rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n), rng.normal(0, 0.1, n), rng.uniform(0.5, 1.5, n)]
            )
    for gate_layer, width in gates:
        kernel, _ = gate_layer.get_weights()  # (1, 1, in, out)
        bias = rng.normal(0, 0.5, width).astype("float32")
        for j in REMOVABLE[width]:
            kernel[..., j], bias[j] = 0.0, -40.0
            kernel[:, :, j, :] = 0.0
        gate_layer.set_weights([kernel, bias])
    return model


if __name__ == "__main__":
    spec = [tf.TensorSpec((None, 32, 32, 3), tf.float32, name="input")]
    tf2onnx.convert.from_keras(network(), input_signature=spec, opset=13, output_path=sys.argv[1])
