"""SigLIP tokenizer folders made inside the tests: SentencePiece models cannot be
downloaded here, so one is trained on the caller's made-up sentences and saved by
transformers' SiglipTokenizer, in T5's layout (<pad> 0, </s> 1, <unk> 2, no <s>)."""

from __future__ import annotations

from pathlib import Path


def save_siglip_tokenizer(lines: list[str], vocab_size: int, work: Path, folder: Path) -> Path:
    """Trains a unigram model of about `vocab_size` pieces on `lines` (its files in
    `work`) and saves the tokenizer into `folder`, which it returns."""
    import sentencepiece
    import transformers

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(work / "t5"), vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        hard_vocab_limit=False, minloglevel=2)
    transformers.SiglipTokenizer(vocab_file=str(work / "t5.model")).save_pretrained(folder)
    return folder
