"""What a package is: its config, contract, variant, manifest, dtypes, rope, ONNX Runtime
versions, chat template and checkpoint resolution. Read by the exporter, the runtime and the server;
imports none of them."""
