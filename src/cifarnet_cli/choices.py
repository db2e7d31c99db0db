"""The values options accept, kept free of heavy imports so that `--help` and shell completion (which
runs `cifarnet` on every Tab press) answer without loading torch."""

CIFAR_ARCHS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
DEVICES = ("auto", "cpu", "cuda", "cuda:0", "cuda:1", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CAPTURE = ("auto", "on", "off")
SCHEDULES = ("cosine", "multistep")
SPLITS = ("test", "val", "train", "all")
EXPORT_FORMATS = ("onnx", "torchscript", "engine")
EXPORT_TARGETS = ("jetson-inference",)
ASSETS = ("cifar10", "resnet50-v1", "resnet50-v2")
WEIGHTS = ("IMAGENET1K_V1", "IMAGENET1K_V2", "none")
