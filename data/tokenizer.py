"""The tokenizer: byte-level BPE trained on a bounded sample of the training split, or an existing
tokenizer.json (e.g. GPT-2's) used exactly as given. Either way one token marks the end of a document."""
import functools
import json
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from config import UserError

END_OF_DOCUMENT = "<|endoftext|>"
# names an end-of-document token goes by in common tokenizers, most likely first
EOD_NAMES = (END_OF_DOCUMENT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|im_end|>")


def train_tokenizer(documents, vocab_size):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_DOCUMENT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=sys.stderr.isatty())
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def training_sample(train_documents, max_bytes):
    """The first documents of the training split up to max_bytes of UTF-8 (at least one): a bounded,
    deterministic sample, so BPE training costs the same on 1 GB as on 100 GB. A corpus smaller than
    max_bytes is used whole."""
    total = 0
    for doc in train_documents:
        yield doc
        total += len(doc.encode("utf-8"))
        if total >= max_bytes:
            return


def special_tokens(tokenizer_json):
    return [t["content"] for t in tokenizer_json.get("added_tokens", []) if t.get("special")]


def end_of_document(tokenizer, eod_token="", where="tokenizer"):
    """The end-of-document token's (name, id): eod_token when given, else the one special token
    that is named like one (GPT-2's <|endoftext|>, Llama's </s>...). One line when there is none."""
    if eod_token:
        eod_id = tokenizer.token_to_id(eod_token)
        if eod_id is None:
            raise UserError(f"{where} has no token {eod_token!r} (eod_token)")
        return eod_token, eod_id
    specials = special_tokens(json.loads(tokenizer.to_str()))
    named = [name for name in EOD_NAMES if name in specials]
    if named:
        return named[0], tokenizer.token_to_id(named[0])
    listed = ", ".join(specials) if specials else "none"
    raise UserError(f"{where} has no end-of-document token among its special tokens ({listed}); "
                    f"name one with eod_token")


def load_tokenizer_file(path, eod_token, vocab_size):
    """An existing tokenizer.json, checked: it loads, it has an end-of-document token, and its
    vocabulary fits in vocab_size (the model's embedding table)."""
    if not os.path.isfile(path):
        raise UserError(f"tokenizer file {path!r} does not exist (tokenizer = path to a tokenizer.json)")
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises plain Exceptions for malformed JSON
        raise UserError(f"tokenizer file {path!r} is not a tokenizers JSON file: {str(e).splitlines()[0]}") from None
    name, eod_id = end_of_document(tokenizer, eod_token, where=f"tokenizer {path!r}")
    if tokenizer.get_vocab_size() > vocab_size:
        raise UserError(f"tokenizer {path!r} has {tokenizer.get_vocab_size():,} tokens, more than "
                        f"vocab_size {vocab_size:,}; set vocab_size to at least {tokenizer.get_vocab_size()}")
    return tokenizer, name, eod_id


def token_byte_lengths(tokenizer):
    """UTF-8 bytes of text each token id stands for, as an int array over the vocabulary; special
    tokens (end-of-document, ...) stand for no text and count 0 (val_bpb leaves them out).

    A byte-level BPE token (GPT-2's, ours) spells its bytes in GPT-2's byte alphabet, one character
    per byte, even where it splits a UTF-8 character; a SentencePiece-style token spells its text with
    ▁ for a space, and <0xNN> for a byte-fallback byte. Any other token is decoded alone."""
    import numpy as np
    decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    byte_level = "ByteLevel" in json.dumps(decoder)
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for token_id in range(len(lengths)):
        token = tokenizer.id_to_token(token_id)
        if token is None or token in specials:
            continue
        if byte_level:
            lengths[token_id] = len(token)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            lengths[token_id] = 1
        elif "\u2581" in token:
            lengths[token_id] = len(token.replace("\u2581", " ").encode("utf-8"))
        else:
            lengths[token_id] = len(tokenizer.decode([token_id]).encode("utf-8"))
    return lengths


@functools.lru_cache(maxsize=8)
def document_start_token(tokenizer_path, eod_token):
    return end_of_document(Tokenizer.from_file(tokenizer_path), eod_token, where=f"tokenizer {tokenizer_path!r}")[1]


def window_start_token(config):
    """The token every validation window starts with under config.doc_windows (the end-of-document
    token, which comes first in each document of such a corpus), else None."""
    return document_start_token(config.tokenizer, config.eod_token) if config.doc_windows else None
