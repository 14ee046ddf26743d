"""easyquant-vllm: data-free EasyQuant weight quantization, its checkpoint format and vLLM serving."""

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """``vllm.general_plugins`` entry point: register the "easyquant" quantization config with vLLM.

    vLLM calls it in every process it starts (API server, engine core, workers); importing the config
    module registers it once per process, and a second call does nothing.
    """
    global _registered
    if _registered:
        return
    from . import vllm_config  # noqa: F401  (the import applies @register_quantization_config)

    _registered = True
