"""Image decoding shared by training and serving, so both see exactly the same pixels."""

from __future__ import annotations

import tensorflow as tf


def fit_to_square(pixels: tf.Tensor, image_size: int) -> tf.Tensor:
    """Scale an image (or a batch) to fit a `image_size` square and pad it with black: float32 in 0..255.

    Letterboxing keeps a wide monitor or a tall microphone in shape instead of squashing it;
    a square image is just resized.
    """
    resized = tf.image.resize_with_pad(tf.cast(pixels, tf.float32), image_size, image_size, antialias=True)
    return tf.clip_by_value(resized, 0.0, 255.0)


def decode_and_resize(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decode one encoded JPEG/PNG/GIF/BMP string to float32 RGB [size, size, 3] in 0..255, letterboxed.

    Raises InvalidArgumentError (at run time) for bytes that are not a decodable image.
    """
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return fit_to_square(image, image_size)
