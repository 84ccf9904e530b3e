"""Send a models.config to a running server with ModelService.HandleReloadConfigRequest (TF Serving's stub).

    python serving/examples/reload_config.py serving/models.config [--server localhost:8500]

Edit the file (version policy, labels, models), then run this: the server replaces its whole config
(a model missing from the file is unloaded) and answers once the change is applied. A label may only
point at a version that is already AVAILABLE: load the version first, then label it in a second reload.
Relative base paths resolve on the server's side (our server: its working directory), and our server
refuses base paths outside its --allowed_model_root. When $PRODUCTLENS_RELOAD_CONFIG_TOKEN is set here,
it is sent as `authorization: Bearer <token>` (our server started with that variable requires it).
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from google.protobuf import text_format
from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a ModelServerConfig text proto, e.g. serving/models.config")
    parser.add_argument("--server", default="localhost:8500", help="host:port of the gRPC API")
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds (loading takes time)")
    args = parser.parse_args(argv)
    with open(args.config, encoding="utf-8") as handle:
        config = text_format.Parse(handle.read(), model_server_config_pb2.ModelServerConfig())
    names = [model.name for model in config.model_config_list.config]
    print(f"sending config for {len(names)} model(s): {', '.join(names)}")
    token = os.environ.get("PRODUCTLENS_RELOAD_CONFIG_TOKEN")  # serving.grpc_api.RELOAD_TOKEN_ENV
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(args.server) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        try:
            stub.HandleReloadConfigRequest(
                model_management_pb2.ReloadConfigRequest(config=config), timeout=args.timeout, metadata=metadata
            )
        except grpc.RpcError as error:
            print(f"HandleReloadConfigRequest failed: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print("reloaded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
