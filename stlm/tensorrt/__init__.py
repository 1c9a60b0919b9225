"""TensorRT facts both the engine builder (:mod:`stlm.export.engine`) and the runtime
(:mod:`stlm.runtime.tensorrt_backend`) use: the engine build record, optimization profiles, the
guarded TensorRT import and plugin registration, and the CUDA helpers. Importing this package is
light: TensorRT and cuda-python are imported only by the functions that need them.
"""
