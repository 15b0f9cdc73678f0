"""kvray: LLM serving on Ray Serve with a paged-KV continuous-batching engine."""
from kvray.replica.outputs import RequestOutput
from kvray.replica.sampling_params import SamplingParams, StructuredOutputs

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutputs", "RequestOutput"]


def __getattr__(name):  # keep `import kvray` light: the engine pulls in torch and transformers
    if name == "LLM":
        from kvray.replica.llm import LLM
        return LLM
    raise AttributeError(name)
