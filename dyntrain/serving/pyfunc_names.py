"""The artifact names of a logged DyNet model (``dyntrain.serving.pyfunc`` reads them,
``dyntrain.serving.publish`` writes them); kept apart so that logging does not import mlflow early."""

WEIGHTS = "weights"            # dynet.safetensors: the consolidated export with its model config
WEIGHTS_REF = "weights_ref"    # weights_ref.json: {"checkpoint": tag folder, "note": ...} instead of a copy
ROUTER = "router"              # router.pt, for variant=auto
SERVING = "serving"            # serving.json: {"default_variant": ...}
