"""easyquant-vllm: data-free EasyQuant weight quantization, its checkpoint format and vLLM serving."""

__version__ = "0.1.0"
