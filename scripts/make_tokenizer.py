"""Train the bundled tiny model's text tokenizer: a SentencePiece model of `text_card` pieces.

Kyutai's checkpoints ship a SentencePiece model (`tokenizer_spm_32k_3.model`, named by
`tokenizer_name` in config.json) that turns the text stream into words. The bundled `tiny` model
gets one of its own, so that the default demo shows words too: trained here, deterministically
(one thread, input not shuffled), on `reference/text/tokenizer_corpus.txt`, the opening paragraphs of
three public-domain novels (Carroll's "Alice's Adventures in Wonderland", 1865; Austen's "Pride
and Prejudice", 1813; Dickens's "A Tale of Two Cities", 1859). Its special ids follow Kyutai's
model: 0 unk, 1 bos, 2 eos, 3 pad (moshi's `existing_text_padding_id`).

    python scripts/make_tokenizer.py            # writes reference/models/tiny/tokenizer.model
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "reference" / "text" / "tokenizer_corpus.txt"
MODEL_DIR = ROOT / "reference" / "models" / "tiny"


def train(corpus: Path, vocab_size: int, out: Path) -> bytes:
    """The serialized SentencePiece model (BPE, byte fallback off, Kyutai's special ids)."""
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    lines = corpus.read_text(encoding="utf-8").splitlines()
    spm.SentencePieceTrainer.train(  # lines, not a path: the model records its input, and must not depend on where
        sentence_iterator=iter(lines), model_writer=buffer, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1,
        shuffle_input_sentence=False, minloglevel=2)
    data = buffer.getvalue()
    out.write_bytes(data)
    return data


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=CORPUS)
    p.add_argument("--out", type=Path, default=MODEL_DIR / "tokenizer.model")
    args = p.parse_args(argv)
    vocab = int(json.loads((MODEL_DIR / "config.json").read_text())["text_card"])
    data = train(args.corpus, vocab, args.out)

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=data)
    sample = "Alice was beginning to get very tired."
    print(f"{args.out}: {sp.get_piece_size()} pieces (text_card {vocab}), {len(data)} bytes, "
          f"sha256 {hashlib.sha256(data).hexdigest()[:16]}")
    print(f"{sample!r} -> {sp.encode(sample, out_type=str)}")
    if sp.get_piece_size() != vocab:
        sys.exit(f"error: trained {sp.get_piece_size()} pieces, the model's text_card is {vocab}")


if __name__ == "__main__":
    main()
