"""Classify a photo with a TensorFlow Serving gRPC client: grpc, the stock tensorflow_serving.apis stubs, and
the signature and tensor names of serving/contract.py.

Works unchanged against `make serve` and the official tensorflow/serving image:

    python serving/examples/grpc_client.py path/to/photo.jpg [--server localhost:8500] [--model productlens]
        [--version N | --label stable] [--classify]

Predict sends the encoded bytes to `serving_default` (decoding and resizing happen in the model) and
prints the top-k classes and whether the top one clears the version's own `not_sure_threshold` output;
--classify sends a tf.Example to the `classification` signature instead.
"""

from __future__ import annotations

import argparse
import sys

import grpc
import tensorflow as tf
from tensorflow_serving.apis import classification_pb2, predict_pb2, prediction_service_pb2_grpc

from serving.contract import CLASS_NAMES, CLASSIFICATION, IMAGE_BYTES, NOT_SURE_THRESHOLD, SCORES, SERVING_DEFAULT


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", help="a JPEG/PNG/GIF/BMP photo")
    parser.add_argument("--server", default="localhost:8500", help="host:port of the gRPC API")
    parser.add_argument("--model", default="productlens")
    version = parser.add_mutually_exclusive_group()
    version.add_argument("--version", type=int, help="a version number (default: the latest loaded)")
    version.add_argument("--label", help="a version label from models.config, e.g. stable")
    parser.add_argument("--classify", action="store_true", help=f"use the Classify API (signature '{CLASSIFICATION}')")
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with open(args.image, "rb") as handle:
        image = handle.read()
    with grpc.insecure_channel(args.server) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            if args.classify:
                request = classification_pb2.ClassificationRequest()
                spec = request.model_spec
                spec.signature_name = CLASSIFICATION
                example = request.input.example_list.examples.add()
                example.features.feature[IMAGE_BYTES].bytes_list.value.append(image)
            else:
                request = predict_pb2.PredictRequest()
                spec = request.model_spec
                spec.signature_name = SERVING_DEFAULT
                request.inputs[IMAGE_BYTES].CopyFrom(tf.make_tensor_proto([image], dtype=tf.string, shape=[1]))
            spec.name = args.model
            if args.version is not None:
                spec.version.value = args.version
            if args.label:
                spec.version_label = args.label
            threshold = None
            if args.classify:
                response = stub.Classify(request, timeout=args.timeout)
                top = [(c.label, c.score) for c in response.result.classifications[0].classes]
            else:
                response = stub.Predict(request, timeout=args.timeout)
                names = tf.make_ndarray(response.outputs[CLASS_NAMES])[0]
                scores = tf.make_ndarray(response.outputs[SCORES])[0]
                top = [(name.decode(), float(score)) for name, score in zip(names, scores, strict=True)]
                if NOT_SURE_THRESHOLD in response.outputs:  # exports before it moved into the model lack it
                    threshold = float(tf.make_ndarray(response.outputs[NOT_SURE_THRESHOLD])[0])
        except grpc.RpcError as error:
            print(f"{error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(f"model {response.model_spec.name} version {response.model_spec.version.value}")
    for label, score in top:
        print(f"  {label:<12} {score:.3f}")
    if threshold is not None:
        verdict = "sure" if top[0][1] >= threshold else "not sure"
        print(f"{verdict}: top-1 {top[0][1]:.3f}, this version's not-sure threshold {threshold:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
