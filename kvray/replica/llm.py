"""The offline API: ``LLM(model).generate(prompts, SamplingParams(...))`` (vLLM's shape)."""
from __future__ import annotations

from tqdm.auto import tqdm

from kvray.replica.config import EngineConfig
from kvray.replica.engine import LLMEngine
from kvray.replica.outputs import RequestOutput
from kvray.replica.sampling_params import SamplingParams


class LLM:
    """Offline batch generation: ``LLM(model).generate(prompts, SamplingParams(...))``."""

    def __init__(self, model: str, **engine_options):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str,)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        eng = self.engine
        seqs = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):  # validate everything before running anything
            text = prompt if isinstance(prompt, str) else None
            ids = eng.tokenize(prompt) if text is not None else list(prompt)
            try:
                seqs.append(eng.make_sequence(None, ids, p, prompt=text))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        bar = tqdm(total=len(seqs), desc="generate", disable=not use_tqdm, unit="req")
        try:
            for seq in seqs:
                eng.add_sequence(seq)
            done = 0
            while eng.has_unfinished():
                eng.step()
                finished = sum(s.is_finished for s in seqs)
                if finished > done:
                    bar.update(finished - done)
                    done = finished
        finally:  # whatever happened, leave no request of this call behind: the LLM stays usable
            bar.close()
            for seq in seqs:
                if not seq.is_finished:
                    eng.abort(seq.request_id)
        failed = [(i, s.error) for i, s in enumerate(seqs) if s.error is not None]
        if failed:
            raise RuntimeError("the engine failed " + "; ".join(f"prompt {i}: {e}" for i, e in failed))
        return [eng.make_output(s) for s in seqs]
