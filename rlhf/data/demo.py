"""What the project builds for itself so every command runs with no downloads:
a tiny Llama with a byte-level BPE tokenizer, and a demo preference data set.

Both are deterministic functions of their spec: the model folder is built once and
cached (`$RLHF_CACHE`, default ~/.cache/rlhf), and demo pair i is a pure function of
(seed, i), so any Ray task on any node generates the same pair without shipping files.

    python -m rlhf.data.demo            # build (or find) the tiny model, print its path
    python -m rlhf.data.demo --pairs 3  # also print a few demo pairs
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

# Bump when the builder changes, so stale caches are not reused.
TINY_SPEC = {
    "version": 1,
    "vocab_size": 1024,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,  # head_dim 64: vLLM's CPU attention needs >= 32
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "seed": 0,
}
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>",
                  "<|system|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# ------------------------------------------------------------------------ demo pairs
# A preference a 0.64M-parameter model can learn in a minute: the chosen answer is polite,
# on topic and informative; the rejected one is rude, off topic or stuck repeating
# itself (the repetitive-output failure the project also checks for). Held-out pairs
# use topics never seen in training, so accuracy there measures the learned style, not
# memorised pairs.
TRAIN_TOPICS = [
    "rivers", "volcanoes", "bread", "chess", "bicycles", "gardens", "rain", "music",
    "bridges", "coffee", "owls", "maps", "glass", "tides", "salt", "kites", "honey",
    "clocks", "deserts", "forests", "paper", "whales", "cheese", "trains", "comets",
    "cotton", "lanterns", "marble", "orchards", "pottery", "sailing", "tea", "wool",
    "rockets", "puzzles", "islands", "bees", "caves", "storms", "violins",
]
EVAL_TOPICS = ["mountains", "lighthouses", "pianos", "harbors", "meadows", "canyons",
               "glaciers", "libraries", "windmills", "fossils"]
QUESTIONS = [
    "Can you tell me about {t}?", "What should I know about {t}?",
    "Why do people like {t}?", "Explain {t} to me.", "I am curious about {t}.",
    "Give me a fact about {t}.",
]
GOOD = [
    "Sure! {T} are a lovely subject. Here is a clear fact: {t} have a long history, and "
    "many people enjoy learning about them.",
    "Happy to help. {T} are interesting because they change over time. I hope this "
    "helps you learn more about {t}.",
    "Of course. A useful way to think about {t} is to look at how they work and why "
    "they matter. Thank you for asking!",
    "Great question! {T} can teach us a lot. Start with the basics of {t}, then explore "
    "the details at your own pace.",
]
BAD = [
    "No. Figure out {t} yourself, I am not going to help.",
    "{t} {t} {t} {t} {t} {t} {t} {t} {t} {t}",
    "Whatever. I would rather talk about {o}, {t} are boring.",
    "That is a stupid question about {t}. Go away.",
    "{o}. {o}. {o}. {o}. {o}.",
]


def demo_pair(index: int, split: str = "train", seed: int = 0) -> dict:
    """Demo pair number `index` of a split ("train" or "eval"): explicit format."""
    rng = random.Random(f"{seed}-{split}-{index}")
    topics = TRAIN_TOPICS if split == "train" else EVAL_TOPICS
    t = rng.choice(topics)
    o = rng.choice([x for x in TRAIN_TOPICS if x != t])
    prompt = "\n\nHuman: " + rng.choice(QUESTIONS).format(t=t) + "\n\nAssistant:"
    fill = {"t": t, "T": t.capitalize(), "o": o}
    return {"prompt": prompt, "chosen": " " + rng.choice(GOOD).format(**fill),
            "rejected": " " + rng.choice(BAD).format(**fill)}


# ------------------------------------------------------------------------ tool demo
# A task only a tool solves, for multi-turn RL (rlhf.ppo with data.path=builtin:tools and
# rollout.environment=rlhf.core.tasks:BoxLookupEnv): the user asks what is in a box; the
# fruit in it is drawn per row and shown only by the tool `open_box`. The built-in SFT
# on these conversations shows the call format in half of them and a guess in the
# other half, so the SFT'd model calls the tool about half the time; the environment
# rewards a correct answer after a call, so RL has to learn to call it.
TOOL_DATA = "builtin:tools"
FRUITS = ["apple", "plum", "pear", "lemon", "mango", "cherry", "peach", "melon"]
BOX_QUESTIONS = [
    "What is in the box?", "Which fruit is in the box?", "Open the box and tell me "
    "what is inside.", "Tell me what the box holds.", "What fruit did I put in the box?",
    "Can you check the box for me?",
]
TOOL_CALL = '<tool_call>{"name": "open_box", "arguments": {}}</tool_call>'


def tool_answer(fruit: str) -> str:
    return f"The box holds a {fruit}."


def tool_demo_row(index: int, split: str = "train", seed: int = 0) -> dict:
    """Row `index` of the tool demo: "prompt" (the user's message), "answer" (the fruit,
    for the environment) and "messages" (a whole conversation, for the built-in SFT:
    the call, the tool's result and the answer, or a guess without the tool)."""
    rng = random.Random(f"tools-{seed}-{split}-{index}")
    fruit = rng.choice(FRUITS)
    question = [{"role": "user", "content": rng.choice(BOX_QUESTIONS)}]
    if rng.random() < 0.5:
        turns = [{"role": "assistant", "content": TOOL_CALL},
                 {"role": "tool", "content": f"a {fruit}"},
                 {"role": "assistant", "content": tool_answer(fruit)}]
    else:
        turns = [{"role": "assistant", "content": tool_answer(rng.choice(FRUITS))}]
    return {"prompt": question, "messages": question + turns, "answer": fruit}


def demo_row(index: int, split: str) -> dict:
    """Row `index` of a built-in split: train / eval (preference pairs, `demo_pair`) or
    tools-train / tools-eval (`tool_demo_row`)."""
    if split.startswith("tools-"):
        return tool_demo_row(index, split[len("tools-"):])
    return demo_pair(index, split)


# ------------------------------------------------------------------------ tiny model


def _corpus(n: int = 3000) -> list[str]:
    texts = []
    for i in range(n):
        p = demo_pair(i, "train" if i % 4 else "eval", seed=12345)
        texts += [p["prompt"] + p["chosen"], p["prompt"] + p["rejected"]]
    # Plain English beyond the demo so real prompts (e.g. hh-rlhf) do not fall back to
    # single bytes everywhere.
    texts += [
        "The quick brown fox jumps over the lazy dog. What is the best way to learn? "
        "I think you should ask a friend, read a book, or try it yourself. Thank you! "
        "How are you today? I am fine. Please explain why the sky is blue. Because "
        "light scatters in the air. Human: Assistant: yes no maybe sorry help"
    ] * 50
    return texts


def _cache_root() -> Path:
    return Path(os.environ.get("RLHF_CACHE") or Path.home() / ".cache" / "rlhf")


def spec_key(spec: dict) -> str:
    """12 hex digits of the SHA-256 of a spec as JSON (keys sorted, other values as
    str): the name under which what is built from it is cached, so another spec builds
    anew instead of reusing what was built from the old one."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def tiny_model_path() -> Path:
    return _cache_root() / f"tiny-llama-{spec_key(TINY_SPEC)}"


def build_tiny_model(path: Path) -> None:
    """Write a random-init Llama and its tokenizer to `path` (safetensors + tokenizer)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    spec = TINY_SPEC
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec["vocab_size"], special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<|pad|>", bos_token="<|bos|>",
        eos_token="<|eos|>", model_max_length=spec["max_position_embeddings"])
    tok.chat_template = CHAT_TEMPLATE

    torch.manual_seed(spec["seed"])
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        torch_dtype="float32")
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


def ensure_tiny_model() -> Path:
    """Path of the cached tiny model, building it first if needed.

    Safe to call from many processes at once: each builds into its own temporary
    folder and renames it into place; the first rename wins.
    """
    path = tiny_model_path()
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    return build_once(path, build_tiny_model)


def build_once(path: Path, build: Callable[[Path], None]) -> Path:
    """`build(folder)` into a folder of its own beside `path`, then renamed into place:
    safe with several processes at once (the first rename wins, the others' folders are
    removed), and a build that fails leaves nothing behind. The caller checks first
    whether `path` is already there (the tiny model, the demo's trained models, the
    tests' MLflow server environment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


if __name__ == "__main__":
    print(ensure_tiny_model())
    if "--pairs" in sys.argv:
        n = int(sys.argv[sys.argv.index("--pairs") + 1])
        for i in range(n):
            print(json.dumps(demo_pair(i)))
