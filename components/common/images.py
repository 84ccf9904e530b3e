"""Image decoding shared by training and serving, so both see exactly the same pixels."""

from __future__ import annotations

import tensorflow as tf


def decode_and_resize(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decode one encoded JPEG/PNG/GIF/BMP string to float32 RGB [size, size, 3] in 0..255.

    Raises InvalidArgumentError (at run time) for bytes that are not a decodable image.
    """
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    return tf.cast(image, tf.float32)
