"""Offline corpus, deterministic split and BPE tokenizer for the tiny Qwen3-MoE.

Sources (both present on a Debian machine without network):
- the Python standard library sources (``sysconfig.get_paths()["stdlib"]``, ``site-packages`` excluded);
- Debian's ``fortunes`` / ``fortunes-min`` English text (``/usr/share/games/fortunes``).

Split: a stdlib file is held out when a hash of its path relative to the stdlib root falls in the
held-out bucket; fortunes are split per entry (hash of file name + entry index), because the package
has only ~50 files. Documents are joined as ``<|endoftext|>`` + text, which is also the format of the
shipped ``heldout.txt`` / ``calib.txt`` (the tokenizer maps the literal marker to the special token,
so tokenizing those files reproduces the training stream exactly).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]  # ids 0..3

FORTUNES_DIR = Path("/usr/share/games/fortunes")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def held_out(key: str, percent: float) -> bool:
    """Deterministic bucket: True for ~``percent`` % of keys."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return (h % 10_000) < percent * 100


def sort_key(key: str) -> str:
    """Deterministic pseudo-random order for sampling documents."""
    return hashlib.sha256(("order:" + key).encode("utf-8")).hexdigest()


@dataclass
class Corpus:
    train_code: list[tuple[str, str]] = field(default_factory=list)  # (key, text)
    heldout_code: list[tuple[str, str]] = field(default_factory=list)
    train_english: list[tuple[str, str]] = field(default_factory=list)
    heldout_english: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def train_docs(self) -> list[str]:
        return [t for _, t in sorted(self.train_code + self.train_english)]

    def heldout_docs(self) -> list[str]:
        return [t for _, t in sorted(self.heldout_code + self.heldout_english)]

    def summary(self) -> dict:
        def size(docs):
            return {"docs": len(docs), "chars": sum(len(t) for _, t in docs)}

        return {
            "train_code": size(self.train_code),
            "heldout_code": size(self.heldout_code),
            "train_english": size(self.train_english),
            "heldout_english": size(self.heldout_english),
            "notes": self.notes,
        }


def _read_text(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    # The special-token markers must never occur inside a document.
    for tok in SPECIAL_TOKENS:
        text = text.replace(tok, tok.replace("|", "| "))
    return text


def stdlib_files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return out


def fortune_files(root: Path = FORTUNES_DIR) -> list[Path]:
    if not root.is_dir():
        return []
    return [
        p
        for p in sorted(root.iterdir())
        if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")
    ]


def load_corpus(heldout_percent: float = 5.0, fortune_doc_chars: int = 4000) -> Corpus:
    corpus = Corpus()
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_files(root):
        text = _read_text(path)
        if not text or not text.strip():
            continue
        key = "stdlib/" + path.relative_to(root).as_posix()
        bucket = corpus.heldout_code if held_out(key, heldout_percent) else corpus.train_code
        bucket.append((key, text))
    corpus.notes.append("stdlib root: the running Python's standard library")

    files = fortune_files()
    if not files:  # no silent fallback: a code-only corpus trains another model
        raise SystemExit(
            f"no fortunes under {FORTUNES_DIR}: the corpus needs Debian's English text "
            "(apt-get install fortunes fortunes-min)"
        )
    for path in files:
        text = _read_text(path)
        if not text:
            continue
        entries = [e.strip("\n") for e in text.split("\n%\n")]
        groups: dict[bool, list[list[str]]] = {True: [[]], False: [[]]}
        for i, entry in enumerate(entries):
            if not entry.strip():
                continue
            is_held = held_out(f"fortunes/{path.name}#{i}", heldout_percent)
            cur = groups[is_held][-1]
            if cur and sum(len(e) + 2 for e in cur) + len(entry) > fortune_doc_chars:
                cur = []
                groups[is_held].append(cur)
            cur.append(entry)
        for is_held, docs in groups.items():
            bucket = corpus.heldout_english if is_held else corpus.train_english
            for j, doc in enumerate(d for d in docs if d):
                bucket.append((f"fortunes/{path.name}/{int(is_held)}/{j}", "\n%\n".join(doc) + "\n"))
    return corpus


def sample_text(
    code: list[tuple[str, str]],
    english: list[tuple[str, str]],
    code_chars: int,
    english_chars: int,
    max_doc_chars: int = 12_000,
) -> str:
    """A deterministic mixed sample: documents picked in hash order, interleaved code/English.

    Long code files are cut at a line boundary to ``max_doc_chars`` so one file cannot dominate.
    Every document is prefixed with the ``<|endoftext|>`` marker.
    """

    def pick(docs, budget):
        chosen, total = [], 0
        for key, text in sorted(docs, key=lambda kt: sort_key(kt[0])):
            if total >= budget:
                break
            if len(text) > max_doc_chars:
                text = text[: text.rfind("\n", 0, max_doc_chars) + 1] or text[:max_doc_chars]
            chosen.append(text)
            total += len(text)
        return chosen

    code_docs, eng_docs = pick(code, code_chars), pick(english, english_chars)
    out, ratio = [], max(1, round(len(code_docs) / max(1, len(eng_docs))))
    ei = 0
    for i, doc in enumerate(code_docs):
        out.append(doc)
        if i % ratio == ratio - 1 and ei < len(eng_docs):
            out.append(eng_docs[ei])
            ei += 1
    out.extend(eng_docs[ei:])
    return "".join(EOS + d for d in out)


def train_tokenizer(docs: list[str], vocab_size: int, out_dir: Path, model_max_length: int):
    """Byte-level BPE trained offline; saved so ``AutoTokenizer.from_pretrained(out_dir)`` works."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast
