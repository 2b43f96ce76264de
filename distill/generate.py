"""Teacher-generated text, for when no corpus is at hand: sample N texts from a prompt list, save as JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distill.config import DistillConfig

# Varied instructions so the samples cover explanation, code, lists and stories, not one register.
DEFAULT_PROMPTS = [
    "Explain how a hash table works.",
    "Write a short story about a lighthouse keeper.",
    "What are the main causes of inflation?",
    "Write a Python function that checks whether a string is a palindrome.",
    "Describe the water cycle to a ten-year-old.",
    "Give me five tips for a job interview.",
    "What is the difference between a virus and a bacterium?",
    "Summarize the plot of Romeo and Juliet.",
    "How do I make a simple tomato soup?",
    "Explain recursion with an example.",
    "Write an email asking a colleague to review a document.",
    "What is photosynthesis?",
    "List the planets of the solar system with one fact about each.",
    "Explain what a database index is and when to use one.",
    "Write a haiku about autumn rain.",
    "How does a bicycle stay upright?",
    "What are the benefits of regular exercise?",
    "Explain the difference between TCP and UDP.",
    "Describe a day in the life of a medieval blacksmith.",
    "Write a SQL query that finds the ten most recent orders.",
    "Why is the sky blue?",
    "Give advice to someone learning to play the guitar.",
    "Explain what machine learning is in simple terms.",
    "Write a product description for a reusable water bottle.",
    "What happened during the French Revolution?",
    "How do vaccines work?",
    "Explain Big-O notation.",
    "Write a dialogue between a cat and a dog about breakfast.",
    "What should I pack for a weekend camping trip?",
    "Explain how compound interest works with an example.",
    "Write a bash command that counts lines in all .txt files.",
    "Describe the rules of chess briefly.",
]
# Templates x topics widen the list to a few hundred distinct prompts.
TEMPLATES = ["Explain {} to a beginner.", "Write a short essay about {}.", "Give three surprising facts about {}.",
             "What are common misconceptions about {}?", "Write a short poem about {}.", "Write a Python example related to {}."]
TOPICS = ["black holes", "the Roman Empire", "sourdough bread", "climate change", "the human heart", "electric cars",
          "sorting algorithms", "the stock market", "honeybees", "the internet", "volcanoes", "jazz music",
          "the printing press", "sleep", "coral reefs", "public key cryptography", "the moon landing", "coffee",
          "renewable energy", "the immune system", "chess openings", "ancient Egypt", "linear regression",
          "migratory birds", "the Python programming language", "earthquakes", "friendship", "solar panels",
          "the French language", "operating systems", "gardening", "the ocean tides", "prime numbers",
          "time management", "the Great Wall of China", "neural networks", "recycling", "mountain climbing",
          "the history of writing", "unit testing"]
DEFAULT_PROMPTS = DEFAULT_PROMPTS + [t.format(topic) for topic in TOPICS for t in TEMPLATES]


def read_prompts(cfg: DistillConfig) -> list[str]:
    if not cfg.prompts:
        return DEFAULT_PROMPTS
    lines = [line.strip() for line in Path(cfg.prompts).read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line]


def chat_prompt(tokenizer, prompt: str) -> str:
    """The prompt in the teacher's chat format; a teacher without a template gets the plain prompt."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return prompt


@torch.no_grad()
def generate_texts(teacher, tokenizer, cfg: DistillConfig, device):
    """Yields batches of samples (prompt + completion, chat-formatted) until cfg.generate_n, cycling through the prompts."""
    prompts = read_prompts(cfg)
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    torch.manual_seed(cfg.seed)
    for start in range(0, cfg.generate_n, cfg.gen_batch_size):
        batch = [prompts[i % len(prompts)] for i in range(start, min(start + cfg.gen_batch_size, cfg.generate_n))]
        texts = [chat_prompt(tokenizer, p) for p in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = teacher.generate(
            **enc,
            do_sample=True,
            temperature=cfg.gen_temperature,
            top_p=cfg.gen_top_p,
            max_new_tokens=cfg.gen_max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        records = []
        for prompt, text, row in zip(batch, texts, out[:, enc["input_ids"].shape[1] :]):
            # The answer ends at the first end-of-turn (= pad) token; the rest is padding.
            completion = tokenizer.decode(row, skip_special_tokens=False).split(tokenizer.pad_token or "\0")[0]
            records.append({"prompt": prompt, "text": text + completion})
        yield records


def save_jsonl(batches, path: Path, progress=None) -> int:
    """Write the samples batch by batch; after each batch the file is complete (atomic rename), so an
    interrupted run still leaves usable data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    for records in batches:
        lines += [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(lines), encoding="utf-8")
        tmp.replace(path)
        if progress:
            progress(len(lines))
    return len(lines)
