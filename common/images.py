"""Image decoding shared by training and serving, so both see exactly the same pixels.

Serving also checks the image header before decoding (`check_pixel_limit`): a few KB of PNG can
claim 20000x20000 pixels and decode to gigabytes. The check uses TensorFlow ops only, so it runs
inside the exported SavedModel and protects `tensorflow/serving` as much as our own server.
"""

from __future__ import annotations

import tensorflow as tf

# The signatures tf.io.decode_image recognises; anything else is refused before decoding.
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GIF_MAGIC = b"GIF8"
BMP_MAGIC = b"BM"
_PNG_HEADER_BYTES = 24  # signature, IHDR length and type, width, height
_GIF_HEADER_BYTES = 13  # "GIF89a" and the logical screen descriptor
_BMP_HEADER_BYTES = 26  # file header and BITMAPINFOHEADER size, width, height
_DIMENSION_CAP = 1 << 31  # no format allows more per side; keeps width * height inside int64
_GIF_BLOCKS_BASE = 1024  # the GIF block walk's budget: this many blocks, plus one per _GIF_BYTES_PER_BLOCK bytes
_GIF_BYTES_PER_BLOCK = 200  # encoders write 255-byte data sub-blocks


def fit_to_square(pixels: tf.Tensor, image_size: int) -> tf.Tensor:
    """Scale an image (or a batch) to fit a `image_size` square and pad it with black: float32 in 0..255.

    Letterboxing keeps a wide monitor or a tall microphone in shape instead of squashing it;
    a square image is just resized.
    """
    resized = tf.image.resize_with_pad(tf.cast(pixels, tf.float32), image_size, image_size, antialias=True)
    return tf.clip_by_value(resized, 0.0, 255.0)


def _unsigned(data: tf.Tensor, offset: int, count: int, big_endian: bool) -> tf.Tensor:
    """The unsigned integer in `count` bytes of `data` from `offset`, as int64 (the caller checked the length)."""
    values = tf.cast(tf.io.decode_raw(tf.strings.substr(data, offset, count), tf.uint8), tf.int64)
    result = tf.constant(0, tf.int64)
    for index in range(count) if big_endian else reversed(range(count)):
        result = result * 256 + values[index]
    return result


def _starts_with(data: tf.Tensor, magic: bytes) -> tf.Tensor:
    return tf.equal(tf.strings.substr(data, 0, len(magic)), magic)


def _gif_frame_pixels(data: tf.Tensor) -> tf.Tensor:
    """Sum of width * height over every image descriptor of a GIF: what giflib allocates before TF decodes.

    The logical screen is not enough: giflib reads every frame (one byte per pixel of its own
    descriptor) even when only the first is kept, so 1,500 small-compressed 3000x3000 frames fit a
    16 MB request and take 13 GB. Walks the blocks, skipping data sub-blocks by their length byte;
    a file with more blocks than the budget (encoders write 255-byte sub-blocks, so only a crafted
    file or an animation of hundreds of tiny frames gets there) is refused rather than walked for seconds.
    """
    raw = tf.cast(tf.io.decode_raw(data, tf.uint8), tf.int64)
    length = tf.size(raw, out_type=tf.int64)
    zero, two = tf.constant(0, tf.int64), tf.constant(2, tf.int64)
    budget = length // _GIF_BYTES_PER_BLOCK + _GIF_BLOCKS_BASE

    def byte(position: tf.Tensor) -> tf.Tensor:
        return tf.gather(raw, tf.minimum(position, length - 1))

    def colour_table_bytes(flags: tf.Tensor) -> tf.Tensor:
        return tf.where(flags >= 128, 3 * tf.bitwise.left_shift(two, flags % 8), zero)

    def skip_sub_blocks(position: tf.Tensor, steps: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Past the sub-blocks from `position` (each a size byte and that many bytes; size 0 ends them)."""
        return tf.while_loop(
            lambda p, s: (p < length) & tf.not_equal(byte(p), 0) & (s < budget),
            lambda p, s: (p + 1 + byte(p), s + 1),
            (position, steps),
        )

    def next_block(position, finished, pixels, steps):
        introducer = byte(position)
        is_extension = tf.equal(introducer, 0x21)
        is_image = tf.equal(introducer, 0x2C) & (position + 10 <= length)
        width = byte(position + 5) + 256 * byte(position + 6)
        height = byte(position + 7) + 256 * byte(position + 8)
        # Image: descriptor (10 bytes), local colour table, LZW minimum code size; extension: introducer, label.
        data = tf.where(is_image, position + 11 + colour_table_bytes(byte(position + 9)), position + 2)
        end, steps = skip_sub_blocks(data, steps + 1)
        # The trailer (0x3B) or any other byte where a block should start ends the walk (giflib stops there too).
        finished = ((~is_extension & ~is_image) | (end + 1 >= length)) & (steps < budget)
        return end + 1, finished, pixels + tf.where(is_image, width * height, zero), steps

    start = 13 + colour_table_bytes(raw[10])
    _, finished, pixels, _ = tf.while_loop(
        lambda position, finished, pixels, steps: ~finished & (steps < budget),
        next_block,
        (start, start >= length, zero, zero),
    )
    walked = tf.debugging.Assert(
        finished,
        [tf.strings.format("GIF has more than {} blocks to check; refused as a possible decompression bomb", budget)],
    )
    with tf.control_dependencies([walked]):
        return tf.identity(pixels)


def image_dimensions(image_bytes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(width, height, decoded_pixels) int64 of one encoded image, read from its header without decoding.

    JPEG via `tf.io.extract_jpeg_shape`, PNG from IHDR, GIF from the logical screen (and
    `decoded_pixels` counts every frame), BMP from BITMAPINFOHEADER. Bytes that are none of these,
    or too short to hold the header, raise InvalidArgumentError ("unsupported image").
    """
    length = tf.strings.length(image_bytes)
    # Every case's condition is evaluated; reading them from a padded copy never runs past a short input.
    header = tf.strings.substr(image_bytes, 0, _BMP_HEADER_BYTES) + b"\0" * _BMP_HEADER_BYTES

    def jpeg() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        shape = tf.io.extract_jpeg_shape(image_bytes, output_type=tf.int64)  # [height, width, channels]
        return shape[1], shape[0], shape[0] * shape[1]

    def png() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        width, height = _unsigned(image_bytes, 16, 4, True), _unsigned(image_bytes, 20, 4, True)
        return width, height, tf.minimum(width, _DIMENSION_CAP) * tf.minimum(height, _DIMENSION_CAP)

    def gif() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        width, height = _unsigned(image_bytes, 6, 2, False), _unsigned(image_bytes, 8, 2, False)
        return width, height, tf.maximum(width * height, _gif_frame_pixels(image_bytes))

    def bmp() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        # Signed 32-bit, as TensorFlow's BMP decoder reads them (a negative height means top-down rows).
        signed = [_unsigned(image_bytes, offset, 4, False) for offset in (18, 22)]
        width, height = (tf.abs(tf.where(v >= 1 << 31, v - (1 << 32), v)) for v in signed)
        return width, height, width * height

    def unsupported() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        refused = tf.debugging.Assert(
            False, ["unsupported image: expected a JPEG, PNG, GIF or BMP (or the header is cut short)"]
        )
        with tf.control_dependencies([refused]):
            minus_one = tf.constant(-1, tf.int64)
            return minus_one, minus_one, minus_one

    return tf.case(
        [
            (_starts_with(header, JPEG_MAGIC), jpeg),
            (
                _starts_with(header, PNG_MAGIC)
                & (length >= _PNG_HEADER_BYTES)
                & tf.equal(tf.strings.substr(header, 12, 4), b"IHDR"),
                png,
            ),
            (_starts_with(header, GIF_MAGIC) & (length >= _GIF_HEADER_BYTES), gif),
            (_starts_with(header, BMP_MAGIC) & (length >= _BMP_HEADER_BYTES), bmp),
        ],
        default=unsupported,
        exclusive=False,
    )


def check_pixel_limit(image_bytes: tf.Tensor, max_pixels: int) -> tf.Tensor:
    """`image_bytes` again, once its header shows a supported image of at most `max_pixels` pixels.

    Raises InvalidArgumentError (at run time) naming the size and the limit otherwise, without
    decoding a pixel; tf.Assert reaches a TF Serving client as INVALID_ARGUMENT.
    """
    width, height, pixels = image_dimensions(image_bytes)
    frame = tf.minimum(width, _DIMENSION_CAP) * tf.minimum(height, _DIMENSION_CAP)
    limit = f", over the limit of {max_pixels} (decompression-bomb protection)"
    message = tf.where(
        tf.equal(pixels, frame),
        tf.strings.format("image is {}x{} = {} pixels" + limit, (width, height, frame)),
        tf.strings.format("image is {}x{} with GIF frames of {} pixels in all" + limit, (width, height, pixels)),
    )
    within = tf.debugging.Assert(pixels <= max_pixels, [message])
    with tf.control_dependencies([within]):
        return tf.identity(image_bytes)


def decode_and_resize(image_bytes: tf.Tensor, image_size: int, max_pixels: int | None = None) -> tf.Tensor:
    """Decode one encoded JPEG/PNG/GIF/BMP string to float32 RGB [size, size, 3] in 0..255, letterboxed.

    With `max_pixels`, the header is checked first (`check_pixel_limit`) and nothing over the limit
    is decoded; the exported model passes it. Training passes none: validation already refused any
    file over the same limit, and a training graph has no untrusted input.

    Raises InvalidArgumentError (at run time) for bytes that are not a decodable image.
    """
    if max_pixels is not None:
        image_bytes = check_pixel_limit(image_bytes, max_pixels)
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return fit_to_square(image, image_size)
