"""``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info`` in vLLM's shapes, answered
by the Router with the model's tokenizer (no replica is involved).

* ``/tokenize``: ``{"prompt": str, "add_special_tokens": true}``, or chat ``{"messages": [...],
  "add_generation_prompt": true, "tools": [...], "chat_template_kwargs": {...}}`` rendered through
  the chat template exactly as ``/v1/chat/completions`` renders it; ``"return_token_strs": true``
  adds the tokens as strings. Answer: ``{"count", "max_model_len", "tokens", "token_strs"}``.
* ``/detokenize``: ``{"tokens": [ids]}`` -> ``{"prompt": text}``.
* ``/tokenizer_info``: the special tokens, the chat template and the context length (what
  lm-eval-harness's remote tokenizer reads).
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kvray.frontend.api import API
from kvray.frontend.body import parse_json, parse_request
from kvray.frontend.errors import APIError
from kvray.frontend.prepare import ModelInfo, Served, chat_prompt, off_loop_if
from kvray.frontend.protocol import ChatCompletionRequest, ChatMessage, Tool


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    return_token_strs: bool | None = False


class TokenizeCompletion(_Request):
    prompt: str
    add_special_tokens: bool | None = True

    def checks(self) -> None:
        pass


class TokenizeChat(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def checks(self) -> None:
        if self.continue_final_message and self.add_generation_prompt:
            raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true",
                           param="continue_final_message")


class Detokenize(_Request):
    tokens: list[int]

    def checks(self) -> None:
        pass


def _check_model(req: _Request, served: Served) -> None:
    if req.model is not None and req.model not in served.model_names:
        raise APIError(404, f"The model '{req.model}' does not exist. Served: {', '.join(served.model_names)}",
                       param="model", code="model_not_found")


class TokenizeAPI(API):
    kind, local = "tokenize", True

    async def answer(self, body: bytes, served: Served) -> dict:
        obj = parse_json(body)
        chat = isinstance(obj, dict) and "messages" in obj
        req = parse_request(TokenizeChat if chat else TokenizeCompletion, obj)
        _check_model(req, served)
        info = served.info
        if chat:
            kwargs = {**(req.chat_template_kwargs or {}),
                      **({"continue_final_message": True} if req.continue_final_message else {})}
            fields = {k: obj[k] for k in ("messages", "tools", "add_generation_prompt") if k in obj}
            ids = (await chat_prompt(parse_request(ChatCompletionRequest, {**fields, "chat_template_kwargs": kwargs}),
                                     info))[0]
        else:
            info.check_prompt_chars(len(req.prompt), "prompt")
            special = req.add_special_tokens is not False
            ids = await off_loop_if(len(req.prompt), lambda: list(
                info.tokenizer(req.prompt, add_special_tokens=special).input_ids))
        strs = info.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": info.max_model_len, "tokens": ids, "token_strs": strs}


class DetokenizeAPI(API):
    kind, local = "detokenize", True

    async def answer(self, body: bytes, served: Served) -> dict:
        req = parse_request(Detokenize, parse_json(body))
        _check_model(req, served)
        vocab = served.info.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
        tok = served.info.tokenizer
        return {"prompt": await off_loop_if(len(req.tokens), lambda: tok.decode(req.tokens))}


def tokenizer_info(info: ModelInfo) -> dict:
    tok = info.tokenizer
    template = getattr(tok, "chat_template", None)
    return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
            "pad_token": tok.pad_token, "unk_token": getattr(tok, "unk_token", None),
            "chat_template": template if isinstance(template, str) else None, "model_max_length": info.max_model_len,
            "vocab_size": info.vocab_size}


TOKENIZE, DETOKENIZE = TokenizeAPI(), DetokenizeAPI()
