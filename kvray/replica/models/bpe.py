"""Real byte-level BPE tokenizers for the presets, trained offline with ``tokenizers``.

The training corpus is generated here from a fixed seed by a self-contained PRNG (splitmix64),
so it is the same on every machine and Python version: English-like prose, made-up words,
numbers, code, and accented / Greek / Cyrillic / CJK / emoji text so that multi-byte UTF-8 gets
merges of its own. Special tokens are appended after the learned vocabulary (as in Qwen and
Llama 3), and the files are written in the layout of the hub's fast tokenizers:
``tokenizer.json``, ``tokenizer_config.json`` (with the chat template) and
``special_tokens_map.json``.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

CORPUS_VERSION = 1  # bump when the corpus or training recipe changes


class SplitMix64:
    """Tiny deterministic PRNG (splitmix64), independent of Python's ``random``."""

    def __init__(self, seed: int):
        self.state = seed & 0xFFFFFFFFFFFFFFFF

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next() % n

    def choice(self, seq):
        return seq[self.below(len(seq))]


_WORDS = """
the of and to in is that it for was on are as with his they at be this from have or by one had
not but what all were when we there can an your which their said if do will each about how up out
them then she many some so these would other into has more her two like him see time could no make
than first been its who now people my made over did down only way find use may water long little
very after words called just where most know get through back much before go good new write our
used me man too any day same right look think also around another came come work three word must
because does part even place well such here take why things help put years different away again
off went old number great tell men say small every found still between name should home big give
air line set own under read last never us left end along while might next sound below saw something
thought both few those always looked show large often together asked house world going want school
important until form food keep children feet land side without boy once animals life enough took
sometimes four head above kind began almost live page got earth need far hand high year mother light
parts country father let night following picture being study second eyes soon times story boys since
white days ever paper hard near sentence better best across during today others however sure means
model token cache block request server latency memory batch kernel tensor layer attention query
value key vector matrix stream queue router replica engine prefix decode prefill sample greedy
""".split()

_FOREIGN = """
café naïve über straße niño façade résumé crème déjà señor año mañana garçon noël zürich köln
fjörð smörgåsbord żółw łódź čeština háček müde schön größe été île forêt élève où français
καλημέρα ελληνικά κόσμος αλφάβητο λόγος φως θάλασσα привет мир спасибо хорошо москва книга
язык время 你好 世界 中文 模型 数据 学习 北京 上海 计算机 日本語 こんにちは ありがとう 東京
カタカナ ひらがな 한국어 안녕하세요 감사합니다 서울 مرحبا العالم שלום עולם नमस्ते दुनिया
😀 🚀 ❤️ 👍 🙂 🎉 🌍 🔥 ✨ 🤖 € £ ¥ °C → ← ✓ … — « » ½ ∑ π √ ∞ ≠ ≤ ≥
""".split()

_CODE = [
    "def {f}(x, y):\n    return x {op} y\n",
    "for i in range({n}):\n    total += values[i] * {n}\n",
    "if {f}({n}) > {m}:\n    print(\"{w}\")\nelse:\n    raise ValueError('{w}')\n",
    "const {f} = ({w}) => {{ return {w}.length {op} {n}; }};\n",
    "SELECT {w}, COUNT(*) FROM {f} WHERE id > {n} GROUP BY {w};\n",
    "{{\"{w}\": {n}, \"{f}\": [{m}, {n}], \"ok\": true}}\n",
    "<div class=\"{w}\">{f} {n}</div>\n",
    "x = torch.zeros({n}, {m}, dtype=torch.float32)\n",
]
_SYLLABLES = "ka ri to na me so lu vi de ra mo chi ten ber lin gor tha shi que ex pro ver ston ing ed er".split()
_PUNCT = [".", ".", ".", "!", "?", ",", ";", ":"]


def _word(rng: SplitMix64) -> str:
    r = rng.below(100)
    if r < 70:
        w = rng.choice(_WORDS)
    elif r < 82:
        w = rng.choice(_FOREIGN)
    elif r < 94:
        w = "".join(rng.choice(_SYLLABLES) for _ in range(1 + rng.below(3)))
    else:
        w = str(rng.below(10 ** (1 + rng.below(4))))
    return w.capitalize() if rng.below(12) == 0 else w


def corpus(seed: int = 1234, num_chars: int = 150_000) -> list[str]:
    """The training corpus: a list of paragraphs, identical for a given seed everywhere."""
    rng = SplitMix64(seed)
    paragraphs, total = [], 0
    while total < num_chars:
        if rng.below(6) == 0:
            para = rng.choice(_CODE).format(f=rng.choice(_WORDS) + "_" + rng.choice(_WORDS), op=rng.choice("+-*/%"),
                                            n=rng.below(1000), m=rng.below(100), w=rng.choice(_WORDS))
        else:
            sentences = []
            for _ in range(1 + rng.below(5)):
                words = [_word(rng) for _ in range(4 + rng.below(12))]
                words[0] = words[0].capitalize()
                sentences.append(" ".join(words) + rng.choice(_PUNCT))
            para = " ".join(sentences) + "\n"
        paragraphs.append(para)
        total += len(para)
    return paragraphs


@dataclass(frozen=True)
class TokenizerSpec:
    """A tokenizer family: learned vocabulary size, special tokens (appended in this order after
    the learned vocabulary), which of them play which role, and the chat template."""
    family: str
    vocab_size: int                    # total, specials included
    special_tokens: tuple[str, ...]
    eos_token: str
    pad_token: str | None
    bos_token: str | None
    add_bos: bool                      # prepend bos_token when encoding (Llama 3 does)
    chat_template: str
    seed: int = 1234

    @property
    def bpe_size(self) -> int:
        return self.vocab_size - len(self.special_tokens)

    def token_id(self, token: str) -> int:
        return self.bpe_size + self.special_tokens.index(token)

    def fingerprint(self) -> dict:
        return {"family": self.family, "vocab_size": self.vocab_size, "special_tokens": list(self.special_tokens),
                "eos": self.eos_token, "pad": self.pad_token, "bos": self.bos_token, "add_bos": self.add_bos,
                "chat_template": self.chat_template, "seed": self.seed, "corpus_version": CORPUS_VERSION}


# The Qwen2.5 / Qwen3 (Hermes-style) shape: with ``tools``, a system turn lists them as JSON in
# <tools></tools> and asks for <tool_call> blocks; assistant ``tool_calls`` come back as those
# blocks and ``tool`` messages as <tool_response> blocks of one user turn (consecutive ones
# grouped). Without tools and tool messages it renders every message as plain ChatML.
CHATML_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message['content'] %}{{- '\\n' + message['content'] }}{%- endif %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set fn = call['function'] if call['function'] is defined else call %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' }}"
    "{%- if fn['arguments'] is string %}{{- fn['arguments'] }}{%- else %}{{- fn['arguments'] | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The Llama 3.1 / 3.2 JSON tool-calling shape: with ``tools``, an "Environment: ipython" system
# turn, and the tools as JSON in the first user turn (or in the system turn with
# ``tools_in_user_message=false``, or when no user turn comes first) with the instruction to
# answer {"name": ..., "parameters": ...}; assistant ``tool_calls`` render as that JSON
# ("; "-separated when several), ``tool`` messages under the ``ipython`` header.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if tools %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- set in_user = (tools_in_user_message is not defined or tools_in_user_message)"
    " and messages and messages[0]['role'] == 'user' %}"
    "{%- set ns = namespace(listing='') %}"
    "{%- for tool in tools %}{%- set ns.listing = ns.listing + (tool | tojson(indent=4)) + '\\n\\n' %}{%- endfor %}"
    "{%- set format = 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument "
    "name and its value}. Do not use variables.\\n\\n' %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nEnvironment: ipython\\n\\n' }}"
    "{%- if not in_user %}"
    "{{- 'You have access to the following functions. To call a function, please respond with JSON for a "
    "function call. ' + format + ns.listing }}"
    "{%- endif %}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- if in_user %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\nGiven the following functions, please respond with a "
    "JSON for a function call with its proper arguments that best answers the given prompt.\\n\\n' }}"
    "{{- format + ns.listing + (messages[0]['content'] | trim) + '<|eot_id|>' }}"
    "{%- set messages = messages[1:] %}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set fn = call['function'] if call['function'] is defined else call %}"
    "{%- if not loop.first %}{{- '; ' }}{%- endif %}"
    "{{- '{\"name\": \"' + fn['name'] + '\", \"parameters\": ' }}"
    "{%- if fn['arguments'] is string %}{{- fn['arguments'] }}{%- else %}{{- fn['arguments'] | tojson }}{%- endif %}"
    "{{- '}' }}"
    "{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- elif message['role'] == 'tool' or message['role'] == 'ipython' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

QWEN_TOKENIZER = TokenizerSpec(
    family="qwen", vocab_size=1024,
    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, add_bos=False,
    chat_template=CHATML_TEMPLATE)

LLAMA3_TOKENIZER = TokenizerSpec(
    family="llama3", vocab_size=1024,
    special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"),
    eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>", bos_token="<|begin_of_text|>", add_bos=True,
    chat_template=LLAMA3_TEMPLATE)


@functools.lru_cache(maxsize=None)
def _trained_json(spec: TokenizerSpec) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.bpe_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus(spec.seed), trainer=trainer)
    if tok.get_vocab_size() != spec.bpe_size:
        raise RuntimeError(f"BPE training reached {tok.get_vocab_size()} tokens, expected {spec.bpe_size}")
    tok.add_special_tokens(list(spec.special_tokens))
    if spec.add_bos:
        bos = spec.bos_token
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, spec.token_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    for t in spec.special_tokens:
        assert tok.token_to_id(t) == spec.token_id(t), t
    return tok.to_str(pretty=True)


def write_tokenizer(spec: TokenizerSpec, out_dir: Path, model_max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json (with chat_template) and special_tokens_map.json."""
    out_dir = Path(out_dir)
    (out_dir / "tokenizer.json").write_text(_trained_json(spec), encoding="utf-8")
    roles = {"bos_token": spec.bos_token, "eos_token": spec.eos_token, "pad_token": spec.pad_token}
    config = {
        "add_bos_token": spec.add_bos,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(spec.token_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                    "single_word": False, "special": True}
            for t in spec.special_tokens},
        **roles,
        "chat_template": spec.chat_template,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", {k: v for k, v in roles.items() if v is not None})


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
